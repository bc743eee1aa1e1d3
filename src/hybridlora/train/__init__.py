"""LoRA fine-tuning of any placement (see ``loop`` for the recipe, outputs and resume semantics)."""
from .loop import (TrainConfig, TrainingError, TrainResult, attach_lora, checkpoints, evaluate_loss, load_adapter,
                   lora_norms, lora_state, prepare_data, run_fingerprint, train)
from .packing import packing_supported

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "attach_lora", "checkpoints", "evaluate_loss",
           "load_adapter", "lora_norms", "lora_state", "packing_supported", "prepare_data", "run_fingerprint", "train"]
