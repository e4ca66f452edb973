"""`MTLModel`: what every mtlxray model shares, whatever its architecture.

- One output dict: `{"lung": B×1×H×W logits, "inf": B×1×H×W logits, "cls": B×C logits}`, with
  None for a task the model (or its current mode) does not produce.
- Phase modes (`set_mode("phase1" | "phase2")`), set before wrapping for DDP.
- A saved model is a folder holding `config.yaml` (the resolved run config) and
  `model.safetensors`, the convention of huggingface_hub's `PyTorchModelHubMixin`, without any
  network use: `MTLModel.from_pretrained(folder)` rebuilds the right architecture from the config
  and loads the weights; every training checkpoint folder is such a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Optional

import torch
import torch.nn as nn

from mtlxray.errors import CheckpointError

if TYPE_CHECKING:
    from mtlxray.config import Config

__all__ = ["MTLModel", "Mode", "WEIGHTS_NAME", "CONFIG_NAME"]

Mode = Literal["phase1", "phase2"]
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


def check_mode(mode: str) -> Mode:
    if mode not in ("phase1", "phase2"):
        raise ValueError(f"mode must be 'phase1' or 'phase2', got {mode!r}")
    return mode  # type: ignore[return-value]


class MTLModel(nn.Module):
    """Base class of every mtlxray model (see the module docstring)."""

    tasks: ClassVar[frozenset[str]] = frozenset({"lung", "inf", "cls"})
    """The outputs this architecture can produce."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: Mode = "phase1"
        self.config: Optional["Config"] = None
        """The run config the model was loaded with (set by `from_pretrained`)."""

    def set_mode(self, mode: Mode) -> None:
        """Select phase1 or phase2 outputs; call before wrapping for DDP."""
        self.mode = check_mode(mode)

    # ---------------------------------------------------------------------------------------------
    # save / load as a folder

    def save_pretrained(self, folder: str | Path, cfg: "Config") -> Path:
        """Write `config.yaml` and fp32 `model.safetensors` into `folder` (each atomically)."""
        from safetensors.torch import save_file

        from mtlxray.config import dump_config
        from mtlxray.io import atomic_path, write_text_atomic

        folder = Path(folder)
        weights = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt"})
        write_text_atomic(folder / CONFIG_NAME, dump_config(cfg))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> "MTLModel":
        """The model saved in `folder` (config.yaml + model.safetensors), in eval mode, with `.config`.

        Weights are loaded strictly; a file that does not fit names the first mismatches.
        """
        from safetensors.torch import load_file

        from mtlxray.config import load_config
        from mtlxray.model.net import build_model

        folder = Path(folder)
        if folder.is_file() and folder.name == WEIGHTS_NAME:
            folder = folder.parent
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: no {name} there (not a saved mtlxray model)")
        cfg = load_config(folder / CONFIG_NAME)
        model = build_model(cfg.model)
        if not isinstance(model, cls):
            raise CheckpointError(f"{folder}: holds a {type(model).__name__}, not a {cls.__name__}")
        model.set_mode(cfg.phase.name)
        try:
            weights = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{folder / WEIGHTS_NAME}: unreadable weights: {e}") from None
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).strip().splitlines()[:3]]
            raise CheckpointError(f"{folder / WEIGHTS_NAME}: does not fit the model: {' '.join(lines)}") from None
        model.config = cfg
        return model.eval()
