"""Per-GPU training memory: activations MEASURED per image on CPU, model state and totals
PROJECTED onto a card (`mtlxray doctor` for a config, the `memory` benchmark suite for the paper's).

The measurement runs one training forward and backward of the model on CPU and counts bytes:

- `retained`: the bytes of every tensor storage the forward created that is still alive when it
  returns, i.e. what is kept for backward: the tensors autograd saves, the inputs a checkpointed
  segment keeps for its recompute and the outputs selective checkpointing keeps. A
  `TorchDispatchMode` records each storage an operator creates (weakly); parameters, buffers and
  their gradients are excluded (they are counted per backend below).
- `backward_peak`: the most bytes of such storages alive at any operator during backward
  (recomputed segments and activation gradients included, parameter gradients excluded).
- `saved_by_hooks`: the distinct storages `torch.autograd.graph.saved_tensors_hooks` sees being
  saved. Without checkpointing it is `retained` less the outputs; inside a checkpointed segment
  torch's own hooks take over, so for checkpointed modes it misses what the checkpoint keeps,
  which is why `retained` is the figure projected.
- `attention_matrices`: retained storages shaped (batch, windows, heads, N, N), the window
  attention's probabilities that SDPA's math path and the explicit softmax keep (a fused kernel
  keeps none of them).

Tensors are fake by default (`FakeTensorMode`: real operators, real shapes, dtypes and autocast,
no arithmetic), so the paper model at 256² is counted in seconds whatever the CPU; a test checks
that fake and real tensors give the same counts. Two batch sizes give bytes per image (the
slope) and fixed bytes (the intercept: bf16 weight copies under autocast, the masks).

The projection adds, per GPU, the model state of each backend (parameters, gradients, AdamW,
DeepSpeed's fp32 partition and its reduce bucket; ZeRO-1/2/3 shard over the GPUs), the CUDA
runtime, and a margin for the caching allocator. It is a projection: `tests/gpu` compares it with
`torch.cuda.max_memory_allocated` where a GPU exists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mtlxray.hardware import resolve_attention
from mtlxray.model import build_model
from mtlxray.train.phases import apply_freezing

__all__ = ["ActivationBytes", "measure_activations", "model_params", "state_bytes", "project", "max_batch",
           "ours_from_config", "place", "tensor_sum", "DTYPES", "BACKENDS", "CHECKPOINT_MODES", "CARDS",
           "RUNTIME_BYTES", "ALLOCATOR_MARGIN", "DS_BUCKET_DEFAULT"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECKPOINT_MODES = ("none", "attention", "block", "selective")
BACKENDS = ("ddp", "zero1", "zero2", "zero3")
RUNTIME_BYTES = int(1.5 * 2**30)
"""CUDA context, NCCL buffers and cuBLAS/cuDNN workspaces: outside the measurement; an allowance."""
ALLOCATOR_MARGIN = 0.10
"""The caching allocator reserves more than it hands out (block rounding, fragmentation):
activations are projected 10% above their measured bytes."""
DS_BUCKET_DEFAULT = int(5e8)
"""DeepSpeed's default `reduce_bucket_size` (elements): with `contiguous_gradients` ZeRO allocates
one such fp32 bucket up front (two with `overlap_comm`), 1.86 GiB whatever the model's size."""
CARDS: dict[str, int] = {
    "80GB": 81_559 * 2**20,
    "141GB": 143_771 * 2**20,
}
"""The memory plan's cards: total memory as nvidia-smi and `torch.cuda.get_device_properties`
report it (H100/A100 80 GB: 81,559 MiB; H200 141 GB: 143,771 MiB)."""


# ---------------------------------------------------------------------------------------------
# the model of a config, as training places it


def ours_from_config(cfg, phase: str | None = None) -> nn.Module:
    """The model of a loaded `Config` in `phase` (default: the config's), frozen as training freezes it."""
    phase = phase or cfg.phase.name
    model = build_model(cfg.model)
    model.set_mode(phase)
    if phase == "phase1":
        apply_freezing(model, cfg.phase.frozen)
    return model


def place(model: nn.Module, dtype: str, device: str | torch.device = "cpu", attention: str = "auto") -> nn.Module:
    """Apply the window-attention kernel that `attention` (`model.attention`) resolves to for
    `dtype` on `device`, as the trainer does where it places the model; models without window
    attention (MONAI's) are returned unchanged."""
    if hasattr(model, "set_attention"):
        model.set_attention(resolve_attention(attention, DTYPES[dtype], torch.device(device).type))
    return model


def tensor_sum(out: Any) -> torch.Tensor:
    """A scalar loss touching every tensor output (dicts, lists and tuples are walked; None skipped)."""
    if out is None:
        return torch.zeros(())
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum((tensor_sum(o) for o in out if o is not None), torch.zeros((), device=_device_of(out)))
    raise TypeError(f"unexpected model output {type(out).__name__}")


def _device_of(out: Any) -> torch.device:
    for o in out:
        if isinstance(o, torch.Tensor):
            return o.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# measurement


class _StorageTracker(TorchDispatchMode):
    """Records (weakly) every storage an operator creates; in backward, tracks the live peak."""

    _expired = staticmethod(torch.UntypedStorage._expired)

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, StorageWeakRef] = {}  # keyed by the StorageImpl address
        self.sizes: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.total = 0  # bytes of the recorded storages not yet seen expired
        self.in_backward = False
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.exclude and ref.cdata not in self.refs:
                    self.refs[ref.cdata] = ref
                    self.sizes[ref.cdata] = (storage.nbytes(), tuple(t.shape))
                    self.total += storage.nbytes()
        if self.in_backward:
            self._prune()
            self.peak = max(self.peak, self.total)
        return out

    def _prune(self) -> None:
        for cdata in [c for c in self.refs if self._expired(c)]:
            self._drop(cdata)

    def _drop(self, cdata: int) -> None:
        del self.refs[cdata]
        self.total -= self.sizes.pop(cdata)[0]

    def forget(self, t: torch.Tensor) -> None:
        """Stop counting `t`'s storage (a parameter's gradient)."""
        cdata = StorageWeakRef(t.untyped_storage()).cdata
        self.exclude.add(cdata)
        if cdata in self.refs:
            self._drop(cdata)

    def live(self, where=lambda shape: True) -> int:
        self._prune()
        return sum(n for n, shape in self.sizes.values() if where(shape))


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one training step of a model, at two batch sizes (see the module doc)."""

    phase: str
    grad_checkpoint: str
    precision: str
    img_size: int
    batches: tuple[int, int]
    retained: tuple[int, int]
    backward_peak: tuple[int, int]
    saved_by_hooks: tuple[int, int]
    attention_matrices: tuple[int, int]
    fake: bool

    def per_image(self, name: str = "retained") -> float:
        (b0, b1), (v0, v1) = self.batches, getattr(self, name)
        return (v1 - v0) / (b1 - b0)

    def fixed(self, name: str = "retained") -> float:
        return getattr(self, name)[0] - self.per_image(name) * self.batches[0]

    def at(self, batch: int) -> float:
        """Projected activation bytes of a step at `batch`: the larger of what the forward keeps
        and the backward's peak, each extrapolated linearly."""
        return max(self.fixed(n) + self.per_image(n) * batch for n in ("retained", "backward_peak"))


def _warm_layouts(model: torch.nn.Module, size: int) -> None:
    """One real eval forward at batch 1, so the model builds its per-size caches (the window
    layout needs real values) before fake tensors run through it."""
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 1, size, size))
    model.train(was)


def _warm_dtype_caches(model, state: dict, size: int, precision: str) -> None:
    """An untracked forward in the step's dtype: masks cached per dtype are built here, not
    counted as the first measured step's activations."""
    from torch.func import functional_call

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        functional_call(model, state, (torch.rand(2, 1, size, size),))


def _saved_hooks(record: dict[int, int]):
    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not (base.is_leaf and base.requires_grad):  # a parameter (or a view of one) is not an activation
            storage = t.untyped_storage()
            record.setdefault(StorageWeakRef(storage).cdata, storage.nbytes())
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _one_step(model, state: dict, batch: int, size: int, precision: str, window_tokens: set[int]) -> tuple[int, ...]:
    from torch.func import functional_call

    exclude = {StorageWeakRef(v.untyped_storage()).cdata for v in state.values()}
    tracker, hooked = _StorageTracker(exclude), {}
    handles = [v.register_post_accumulate_grad_hook(lambda p: tracker.forget(p.grad))
               for v in state.values() if v.requires_grad]
    try:
        x = torch.rand(batch, 1, size, size)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), _saved_hooks(hooked):
                out = functional_call(model, state, (x,))
            retained = tracker.live()
            attention = tracker.live(lambda s: len(s) == 5 and s[0] == batch and s[-1] == s[-2] and s[-1] in window_tokens)
            loss = tensor_sum(out)
            del out
            tracker.in_backward, tracker.peak = True, retained
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for v in state.values():
            v.grad = None  # as zero_grad(set_to_none=True) leaves them for the next step
    return retained, tracker.peak, sum(hooked.values()), attention


def measure_activations(cfg, *, phase: Optional[str] = None, precision: str = "bf16",
                        batches: tuple[int, int] = (2, 4), fake: bool = True,
                        modes: Optional[Iterable[str]] = None) -> list[ActivationBytes]:
    """Count the activation bytes of a training step of `cfg`'s model (see the module doc), for
    each checkpointing mode in `modes` (default: the config's), on one model built once.

    The window-attention kernel is the one `cfg.model.attention` resolves to on a GPU. Batches
    must be >= 2 (batch norm in training needs two values after the 1×1 pyramid pool)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    phase = phase or cfg.phase.name
    size = cfg.model.img_size
    torch.manual_seed(0)
    model = place(ours_from_config(cfg, phase), precision, "cuda", cfg.model.attention).train()
    _warm_layouts(model, size)
    window_tokens = {m.window_size ** 2 for m in model.modules() if hasattr(m, "window_size")}
    # One fake mode for every step: the model caches its masks (as fake tensors) on first use.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    out = []
    with fake_mode, warnings.catch_warnings():
        # torch warns that SAC-saved tensors bypass outer saved-tensor hooks: the tracker counts them
        warnings.filterwarnings("ignore", message="A saved_tensors_hooks context", category=FutureWarning)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if fake:
            state = {k: fake_mode.from_tensor(v) for k, v in state.items()}
        _warm_dtype_caches(model, state, size, precision)
        for mode in modes or [cfg.model.grad_checkpoint]:
            model.set_grad_checkpointing(mode)
            retained, peak, hooked, attention = zip(*(
                _one_step(model, state, b, size, precision, window_tokens) for b in batches))
            out.append(ActivationBytes(
                phase=phase, grad_checkpoint=mode, precision=precision, img_size=size, batches=tuple(batches),
                retained=retained, backward_peak=peak, saved_by_hooks=hooked, attention_matrices=attention,
                fake=fake))
    return out


def model_params(cfg, phase: Optional[str] = None) -> tuple[int, int]:
    """(all parameters, trainable parameters) of `cfg`'s model in `phase`."""
    model = ours_from_config(cfg, phase)
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


# ---------------------------------------------------------------------------------------------
# projection


def state_bytes(backend: str, gpus: int, params: int, trainable: int,
                bucket_elements: int = DS_BUCKET_DEFAULT, overlap_comm: bool = False) -> dict[str, float]:
    """Per-GPU bytes of the model state under `backend` over `gpus` data-parallel GPUs.

    Weights stay fp32 on every backend (bf16 is autocast: DDP, and DeepSpeed's `torch_autocast`).
    - ddp: fp32 weights, gradients twice (`.grad` and DDP's bucket copy; accelerate leaves
      `gradient_as_bucket_view` off), AdamW's two fp32 moments.
    - zero1: the moments and DeepSpeed's fp32 copy of the trained weights sharded over the GPUs;
      gradients whole; the fp32 reduce bucket.
    - zero2: gradients sharded too.
    - zero3: weights sharded too, plus the working set gathered for compute (at most all of them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n = max(1, gpus)
    shard = 1 if backend == "ddp" else n
    bucket = 0 if backend == "ddp" else 4 * bucket_elements * (2 if overlap_comm else 1)
    out = {
        "weights": 4 * params / (n if backend == "zero3" else 1),
        "gathered_weights": 4 * params if backend == "zero3" else 0,
        "grads": 4 * trainable * (2 if backend == "ddp" else 1) / (n if backend in ("zero2", "zero3") else 1),
        "adamw": 8 * trainable / shard,
        "fp32_partition": 0 if backend == "ddp" else 4 * trainable / n,
        "buckets": bucket,
    }
    out["total"] = sum(out.values())
    return out


def project(act: ActivationBytes, batch: int, backend: str, gpus: int, params: int, trainable: int,
            **bucket) -> dict[str, float]:
    """Per-GPU bytes of a training step at per-GPU `batch`: model state + activations (with the
    allocator margin) + the CUDA runtime."""
    state = state_bytes(backend, gpus, params, trainable, **bucket)["total"]
    activations = act.at(batch) * (1 + ALLOCATOR_MARGIN)
    return {"state": state, "activations": activations, "runtime": RUNTIME_BYTES,
            "total": state + activations + RUNTIME_BYTES}


def max_batch(act: ActivationBytes, capacity: int, backend: str, gpus: int, params: int, trainable: int,
              **bucket) -> int:
    """The largest per-GPU batch whose projection fits in `capacity` bytes (0 if none does)."""
    fixed = project(act, 0, backend, gpus, params, trainable, **bucket)["total"]
    per_image = project(act, 1, backend, gpus, params, trainable, **bucket)["total"] - fixed
    return max(0, math.floor((capacity - fixed) / per_image)) if per_image > 0 else 0
