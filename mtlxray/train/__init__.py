"""Training: losses, phases, the Accelerate/DeepSpeed loop, checkpoints and preemption."""

from mtlxray.checkpoint import load_model_from_checkpoint
from mtlxray.train.main import run_training

__all__ = ["run_training", "load_model_from_checkpoint"]
