"""mtlxray.train.checkpoints: a checkpoint is written whole with the run's file mode, or not at all."""

import errno
import os
from pathlib import Path

import pytest
import torch

from mtlxray.checkpoint import TrainState, read_state, verify_checkpoint
from mtlxray.config import load_config
from mtlxray.errors import CheckpointError
from mtlxray.model import build_model
from mtlxray.train.checkpoints import save_checkpoint

TINY = ["model.img_size=64", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
        "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
        "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8"]


def _saver(tmp_path: Path):
    """A save of a tiny model and its optimizer state through a real accelerator: save(step) -> folder."""
    from accelerate import Accelerator

    cfg = load_config(None, TINY)
    acc = Accelerator()  # no arguments: whatever an earlier test set up for the process is kept
    model = build_model(cfg.model)
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    model(torch.zeros(2, 1, 64, 64, device=acc.device))["lung"].sum().backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    return lambda step: save_checkpoint(acc, model, model, root, TrainState(step=step), cfg, last=True, best=False)


def test_every_checkpoint_file_follows_the_umask(tmp_path):
    save = _saver(tmp_path)
    umask = os.umask(0o027)
    try:
        folder = save(1)
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o640"}, modes


def _enospc_in_weights(tensors, path, *args, **kwargs):
    Path(path).write_bytes(b"\0" * 100)  # what fitted before the disk filled
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _enospc_in_torch_save(obj, f, *args, **kwargs):  # how torch's writer reports a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                       "PytorchStreamWriter failed writing file data/0: file write failed")


@pytest.mark.parametrize("where, fault", [("safetensors.torch.save_file", _enospc_in_weights),
                                          ("torch.save", _enospc_in_torch_save)])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_last_as_it_was(tmp_path, monkeypatch, where, fault):
    save = _saver(tmp_path)
    save(1)
    root = tmp_path / "checkpoints"
    monkeypatch.setattr(where, fault)
    with pytest.raises(CheckpointError) as err:
        save(2)
    message = str(err.value)
    assert "\n" not in message and str(root / "step-000002") in message and "MiB free" in message, message
    assert "file write failed" in message or "No space left on device" in message, message
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-000001"]  # no half-written step-000002
    assert read_state(root / "last").step == 1 and verify_checkpoint(root / "last").step == 1
