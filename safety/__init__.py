from safety.checker import SafetyChecker, UnsafeOutputError

__all__ = ["SafetyChecker", "UnsafeOutputError"]
