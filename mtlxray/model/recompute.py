"""Activation checkpointing: whole segments, or selective (keep compute-bound outputs, recompute the rest).

`selective` runs a segment under torch's selective activation checkpointing with one policy: the
output of a matmul or convolution is kept when it contracts over at least `MIN_SAVED_REDUCTION`
elements (recomputing it would cost at least 1 kFLOP per element kept); everything else is
recomputed in backward: norms, activations, softmax, window gathers, upsampling, concatenation,
residual adds, the attention products (contracting over a 32-wide head or a 49-token window),
depthwise convolutions and the narrow first stages' projections. Those hold most of the activation
bytes and few of the FLOPs. Measured memory and step time of every mode: benchmarks/README.md.

A recomputed batch norm must not update its running statistics a second time, so every recompute
(whole or selective) runs with the segment's batch norms at momentum 0, which makes the update a
no-op while the output, computed from the batch's own statistics in training, is unchanged; their
`num_batches_tracked` is restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Literal, get_args

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["CheckpointMode", "CHECKPOINT_MODES", "run_checkpointed", "run_segment"]

CheckpointMode = Literal["none", "attention", "block", "selective"]
CHECKPOINT_MODES: tuple[str, ...] = get_args(CheckpointMode)

MIN_SAVED_REDUCTION = 512

_aten = torch.ops.aten
_FUSED_ATTENTION = frozenset({
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_flash_attention.default,
})
# op -> position of the operand whose last dimension is the contraction
_MATMULS = {_aten.mm.default: 0, _aten.bmm.default: 0, _aten.addmm.default: 1, _aten.baddbmm.default: 1}


def _reduction(op, args) -> int:
    """Elements summed per output element of a matmul or convolution; 0 for any other op."""
    if op in _MATMULS:
        return args[_MATMULS[op]].shape[-1]
    if op == _aten.convolution.default:
        weight = args[1]  # out, in/groups, *kernel
        return weight[0].numel()
    return 0


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _FUSED_ATTENTION or _reduction(op, args) >= MIN_SAVED_REDUCTION:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms of `module` with momentum 0: a recompute does not update running statistics twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextlib.contextmanager
def _recompute(module: nn.Module, recompute_ctx) -> Iterator[None]:
    with _frozen_bn_stats(module), recompute_ctx:  # outside: its own clone and copy are not recomputed ops
        yield


def _whole_contexts(module: nn.Module):
    return contextlib.nullcontext(), _frozen_bn_stats(module)


def _selective_contexts(module: nn.Module):
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_policy)
    return forward_ctx, _recompute(module, recompute_ctx)


def run_checkpointed(module: nn.Module, fn: Callable[..., torch.Tensor], *args, selective: bool = False):
    """`fn(*args)` (a computation of `module`) with its activations recomputed in backward.

    Non-reentrant, so it composes with DDP, ZeRO and frozen parameters; outside autograd it is a
    plain call."""
    if not torch.is_grad_enabled():
        return fn(*args)
    contexts = _selective_contexts if selective else _whole_contexts
    return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(contexts, module))


def run_segment(module: nn.Module, fn: Callable[..., torch.Tensor], *args):
    """`fn(*args)` for a block-level segment (a Swin block, a decoder stage, a cross-attention):
    recomputed whole or selectively when `module.grad_checkpoint` is `block` or `selective`."""
    mode = module.grad_checkpoint
    if mode in ("block", "selective"):
        return run_checkpointed(module, fn, *args, selective=mode == "selective")
    return fn(*args)
