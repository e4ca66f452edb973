"""`MTLModel`: what every mtlxray model shares, whatever its architecture.

- One output dict: `{"lung": B×1×H×W logits, "inf": B×1×H×W logits, "cls": B×C logits}`, with
  None for a task the model (or its current mode) does not produce.
- Phase modes (`set_mode("phase1" | "phase2")`), set before wrapping for DDP.
- The window-attention kernel (`set_attention("sdpa" | "explicit")`), chosen once by the code that
  places the model on a device and precision (`mtlxray.hardware.resolve_attention`).
- A saved model is a folder holding `config.yaml` (the resolved run config) and
  `model.safetensors`, the convention of huggingface_hub's `PyTorchModelHubMixin`, without any
  network use: `model.save_pretrained(folder, cfg)` writes it, `MTLModel.from_pretrained(folder)`
  rebuilds the right architecture from the config and loads the weights (in eval mode, as the
  mixin does); every training checkpoint folder is such a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn

from mtlxray.config import Config, dump_config, load_config
from mtlxray.errors import CheckpointError, error_line
from mtlxray.io import atomic_path, write_text_atomic
from mtlxray.model.registry import build_model
from mtlxray.model.swin import WindowAttention, check_kernel

__all__ = ["MTLModel", "Mode", "WEIGHTS_NAME", "CONFIG_NAME", "under_prefix", "read_weights"]


def under_prefix(name: str, prefix: str) -> bool:
    """True if the dotted name lies under the module prefix (`inf_head` covers `inf_head.conv.weight`,
    not `inf_headx.weight`). Freezing, learning-rate groups and weight loading all select modules so."""
    return name == prefix or name.startswith(prefix + ".")

Mode = Literal["phase1", "phase2"]
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors file; CheckpointError in one line when it is corrupt or truncated."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt headers and short files
        raise CheckpointError(f"{path}: unreadable weights (corrupt or truncated): {error_line(e)}") from None


def check_mode(mode: str) -> Mode:
    if mode not in ("phase1", "phase2"):
        raise ValueError(f"mode must be 'phase1' or 'phase2', got {mode!r}")
    return mode  # type: ignore[return-value]


class MTLModel(nn.Module):
    """Base class of every mtlxray model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: frozenset[str] = frozenset()
        """The outputs the model can produce, in either phase (set by `build_model` from its spec)."""
        self.mode: Mode = "phase1"
        self.config: Optional["Config"] = None
        """The run config the model was loaded with (set by `from_pretrained`)."""

    def set_mode(self, mode: Mode) -> None:
        """Select phase1 or phase2 outputs; call before wrapping for DDP."""
        self.mode = check_mode(mode)

    # ---------------------------------------------------------------------------------------------
    # window-attention kernel

    def set_attention(self, kernel: str) -> None:
        """Run every window attention of the model with `kernel` (`sdpa` or `explicit`); models
        without window attention ignore it. Call it once where the model is placed on a device
        and precision, with the choice made there (timm's `fused_attn`, as a method):

            model.set_attention(mtlxray.hardware.resolve_attention(cfg.model.attention, precision, device.type))
        """
        check_kernel(kernel)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.set_attention(kernel)

    @property
    def attention_kernel(self) -> Optional[str]:
        """The window-attention kernel in use, or None for a model without window attention."""
        return next((m.attention for m in self.modules() if isinstance(m, WindowAttention)), None)

    # ---------------------------------------------------------------------------------------------
    # save / load as a folder

    def save_pretrained(self, folder: str | Path, cfg: Optional["Config"] = None) -> Path:
        """Write `config.yaml` and fp32 `model.safetensors` into `folder` (created; each file atomic).

        cfg: the run config the model was built from (default: `self.config`, set by
        `from_pretrained`). Its `phase.name` must be the model's mode, which `from_pretrained`
        restores. The folder is what `from_pretrained`, `predict --checkpoint` and
        `export --checkpoint` read. Returns the folder.
        """
        from safetensors.torch import save_file

        cfg = cfg if cfg is not None else self.config
        if cfg is None:
            raise ValueError("save_pretrained needs the run config the model was built from (cfg=...)")
        if cfg.phase.name != self.mode:
            raise ValueError(f"the model is in {self.mode} mode but cfg.phase.name is {cfg.phase.name!r}: "
                             "from_pretrained would restore the wrong outputs")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt"})
        write_text_atomic(folder / CONFIG_NAME, dump_config(cfg))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu", *,
                        strict: bool = True) -> "MTLModel":
        """The model saved in `folder` (config.yaml + model.safetensors; a training checkpoint
        folder, its `last`/`best` link, or a `save_pretrained` folder), in eval mode and the saved
        phase mode, with `.config` set. Only local folders are read: nothing is downloaded.

        Weights are loaded strictly by default; a file that does not fit names the first
        mismatches. The window-attention kernel is the config's (`auto`: SDPA) until
        `set_attention`.
        """
        folder = Path(folder)
        if folder.is_file() and folder.name == WEIGHTS_NAME:
            folder = folder.parent
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder (from_pretrained reads a local folder "
                                  "written by save_pretrained or by training; nothing is downloaded)")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: no {name} there (not a saved mtlxray model)")
        cfg = load_config(folder / CONFIG_NAME)
        model = build_model(cfg.model, pretrained=False)  # the folder's weights replace any init
        if not isinstance(model, cls):
            raise CheckpointError(f"{folder}: holds a {type(model).__name__}, not a {cls.__name__}")
        model.set_mode(cfg.phase.name)
        weights = read_weights(folder / WEIGHTS_NAME, device=str(map_location))
        model.to(map_location)
        try:
            model.load_state_dict(weights, strict=strict)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).strip().splitlines()[:3]]
            raise CheckpointError(f"{folder / WEIGHTS_NAME}: does not fit the model: {' '.join(lines)}") from None
        model.config = cfg
        return model.eval()
