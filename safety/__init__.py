from safety.checker import SafetyChecker

__all__ = ["SafetyChecker"]
