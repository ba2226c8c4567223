from lora_loading.adapters import LoraAdapters, LoraFile, LoraFormatError

__all__ = ["LoraAdapters", "LoraFile", "LoraFormatError"]
