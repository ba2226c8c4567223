from lora_loading.adapters import LoraAdapters
from lora_loading.formats import LoraFile

__all__ = ["LoraAdapters", "LoraFile"]
