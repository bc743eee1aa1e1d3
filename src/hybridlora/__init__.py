"""hybridlora: component-aware LoRA placement for hybrid language models."""
__version__ = "0.1.0"
