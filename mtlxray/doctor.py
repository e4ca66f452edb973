"""`mtlxray doctor [--config C] [--json]`: what this node offers, and whether a config can run here.

Run it on a login or compute node before submitting. It reports:

- torch, CUDA, cuDNN and NCCL versions; each GPU's name, memory, compute capability and bf16;
- which SDPA kernels (flash, memory-efficient, cuDNN, math) accept the configured model's window
  attention as the model calls it: each distinct window-attention shape of the model (batch ×
  windows × heads × N × head_dim, with the additive bias + shift/padding mask) is run forward and
  backward in the configured precision with `torch.nn.attention.sdpa_kernel` restricted to one
  kernel at a time; the reason a kernel refuses is PyTorch's own warning;
- DeepSpeed's ops, compatible and installed (`ds_report` in brief), when run.backend is deepspeed;
- the Slurm variables it sees;
- every problem `mtlxray.preflight.check_run` finds in the config against its shards and model
  (what `mtlxray train` would refuse), and whether the shards are readable and their manifest
  complete, for the training and validation splits the config reads;
- free disk in the run folder against the checkpoints the run will keep;
- a memory projection of the config on the GPU it sees (`mtlxray.memory_plan`; on a node without
  GPU, on the memory plan's 80 GB and 141 GB cards).

It ends with one verdict line per problem. Exit status: 0 when the config can run here (warnings
allowed), 1 when it cannot, 2 for a config that does not load.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import platform
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mtlxray.data import remote
from mtlxray.data.loader import shard_urls
from mtlxray.data.manifest import read_manifest, shard_subsets
from mtlxray.errors import ConfigError, MtlxError
from mtlxray.hardware import (attention_choice, cpu_has_native_bf16, cuda_devices, resolve_attention, resolve_precision,
                              resolve_workers)
from mtlxray.memory_plan import (CARDS, DS_BUCKET_DEFAULT, max_batch, measure_activations, model_params,
                                 ours_from_config, project)
from mtlxray.model.swin import WindowAttention
from mtlxray.preflight import check_run
from mtlxray.train.accelerator import deepspeed_config
from mtlxray.train.compiled import compiles

__all__ = ["Finding", "Diagnosis", "diagnose", "render"]

_GiB = 2**30

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
SLURM_PREFIXES = ("SLURM_",)
SLURM_EXTRA = ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Finding:
    """One line of the verdict (a `mtlxray.preflight.Problem` becomes an error finding)."""

    level: str  # "error": the config cannot run here; "warning": it can, with the caveat given
    text: str


@dataclass
class Diagnosis:
    """What `doctor` found: named sections (for the report and --json) and the problems."""

    sections: dict[str, Any] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)

    def error(self, text: str) -> None:
        if Finding("error", text) not in self.problems:  # the preflight and the shard read may meet one fault
            self.problems.append(Finding("error", text))

    def warn(self, text: str) -> None:
        self.problems.append(Finding("warning", text))

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    def as_dict(self) -> dict:
        return {**self.sections, "problems": [p.__dict__ for p in self.problems], "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# environment


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        with contextlib.suppress(Exception):
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cudnn": cudnn, "nccl": nccl,
        "accelerate": _version("accelerate"), "deepspeed": _version("deepspeed"), "mtlxray": _version("mtlxray"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def slurm_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(SLURM_PREFIXES) or k in SLURM_EXTRA}


def deepspeed_ops() -> list[dict]:
    """DeepSpeed's op builders for this accelerator: compatible here, and prebuilt (installed)."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    rows = []
    for name, builder in ALL_OPS.items():
        try:
            compatible = bool(builder.is_compatible(verbose=False))
        except Exception as e:  # noqa: BLE001 - a builder that cannot even check is incompatible
            compatible = False
            name = f"{name} ({type(e).__name__})"
        rows.append({"op": name, "compatible": compatible, "installed": bool(installed_ops.get(name, False))})
    return rows


# ---------------------------------------------------------------------------------------------
# the config's window attention under each SDPA kernel


def _backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def window_attention_shapes(model: torch.nn.Module, img_size: int) -> list[tuple[torch.nn.Module, tuple]]:
    """One representative window attention per distinct (input shape, heads, window, shift) of
    `model`, with its input shape (1, H, W, C), found by a batch-1 forward with hooks."""
    seen: dict[tuple, tuple[torch.nn.Module, tuple]] = {}

    def hook(module, args):
        shape = tuple(args[0].shape)
        key = (shape[1:], module.num_heads, module.window_size, module.shift_size)
        seen.setdefault(key, (module, shape))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, WindowAttention)]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.rand(1, 1, img_size, img_size))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def _sdpa_shape(module, shape: tuple, batch: int) -> str:
    """batch × (windows·heads) × N × head_dim of the attention call for an input of `shape` (the
    model folds its windows into the head axis)."""
    _, H, W, C = shape
    ws = module.window_size
    windows = (-(-H // ws)) * (-(-W // ws))
    return f"{batch}x{windows * module.num_heads}x{ws * ws}x{C // module.num_heads}"


def _mask_kind(module, shape: tuple) -> str:
    """What the attention call adds to its scores: the position bias, plus the shifted windows'
    mask and/or the mask of the padding that rounds the map up to whole windows."""
    masks = [m for m, on in (("shift", module.shift_size > 0), ("padding", shape[1] % module.window_size))
             if on]
    return "+".join(["bias", *masks]) + (" mask" if masks else "")


def probe_sdpa(model: torch.nn.Module, img_size: int, batch: int, precision: str, device: torch.device) -> list[dict]:
    """For each window-attention shape of `model`: which SDPA kernels run its forward and backward
    on `device` in `precision` (bias + mask included), and why the others refuse."""
    backends = _backends()
    from torch.nn.attention import sdpa_kernel

    rows = []
    for module, shape in window_attention_shapes(model, img_size):
        attn = copy.deepcopy(module).to(device).train()
        attn.set_attention("sdpa")
        x = torch.randn(batch, *shape[1:], device=device, requires_grad=True)
        row = {"shape": _sdpa_shape(module, shape, batch), "shifted": module.shift_size > 0,
               "mask": _mask_kind(module, shape),
               "dtype": precision, "accepts": {}, "why_not": {}}
        for name in SDPA_KERNELS:
            if name not in backends or (device.type != "cuda" and name in ("efficient", "cudnn")):
                row["accepts"][name] = False
                row["why_not"][name] = "not in this torch" if name not in backends else "CUDA only"
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backends[name]]), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                        enabled=precision == "bf16"):
                        out = attn(x)
                    out.float().sum().backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    row["accepts"][name] = True
                except RuntimeError as e:
                    row["accepts"][name] = False
                    reasons = [str(w.message).strip() for w in caught if "kernel" in str(w.message).lower()]
                    row["why_not"][name] = _first_line(" ".join(reasons) or str(e))
            x.grad = None
        rows.append(row)
        del attn
    return rows


def _first_line(text: str, limit: int = 240) -> str:
    text = re.sub(r"\(Triggered internally at [^)]*\)", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# shards, disk, memory


def check_shards(cfg, diag: Diagnosis) -> dict:
    """With a readable manifest: every listed shard present with its size, readable, and the split
    counts complete, for the training and validation splits the config reads."""
    root = cfg.data.shards
    out: dict[str, Any] = {"root": str(root)}
    try:
        manifest = read_manifest(root)
    except MtlxError:  # the preflight names it
        out["ok"] = False
        return out
    out["image_size"] = manifest.image_size
    out["format"] = manifest.format
    splits: dict[str, Any] = {}
    for subset in shard_subsets(cfg.data):
        for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)):
            key = f"{subset}/{split}"
            try:
                urls = shard_urls(root, manifest, subset, split)
            except MtlxError as e:
                diag.error(f"data.shards: {e}")
                splits[key] = {"ok": False}
                continue
            entries = manifest.entries(subset, split)
            samples = sum(e.get("samples", 0) for e in entries)
            expected = manifest.count(subset, split)
            if expected is not None and expected != samples:
                diag.error(f"shards: {key}: the manifest counts {expected} images but its shards hold {samples} "
                           "(an incomplete manifest or build)")
            unreadable = []
            for url in urls:
                if remote.is_remote(url):
                    continue
                try:
                    with open(url, "rb") as f:
                        if len(f.read(512)) < 512:
                            unreadable.append(f"{url} (shorter than a tar header)")
                except OSError as e:
                    unreadable.append(f"{url} ({e.strerror})")
            for u in unreadable[:3]:
                diag.error(f"shards: cannot read {u}")
            splits[key] = {"shards": len(entries), "samples": samples, "ok": not unreadable,
                           "remote": remote.is_remote(str(root))}
    out["splits"] = splits
    out["ok"] = all(s.get("ok") for s in splits.values())
    return out


def check_disk(cfg, params: Optional[int], diag: Diagnosis) -> dict:
    """Free space where the run writes, against three checkpoints (a new one is written before the
    old one goes; `last` and `best` may differ): weights fp32 plus AdamW's two moments."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    where = run_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    need = 3 * 16 * params + _GiB if params else None
    if need is not None and free < need:
        diag.warn(f"disk: {free / _GiB:.1f} GiB free under {where}, the run's checkpoints need about "
                  f"{need / _GiB:.1f} GiB")
    return {"run_dir": str(run_dir), "checked": str(where), "free_bytes": free, "checkpoints_need_bytes": need}


def _backend(cfg) -> tuple[str, dict]:
    """(memory-plan backend name, DeepSpeed bucket settings) of the config."""
    if cfg.run.backend != "deepspeed":
        return "ddp", {}
    ds = deepspeed_config(cfg)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    bucket = zero.get("reduce_bucket_size", DS_BUCKET_DEFAULT)
    bucket = int(bucket) if isinstance(bucket, (int, float)) else DS_BUCKET_DEFAULT
    return ("ddp" if stage == 0 else f"zero{stage}"), {"bucket_elements": bucket,
                                                       "overlap_comm": bool(zero.get("overlap_comm", False))}


def check_memory(cfg, precision: str, seen: list[dict], diag: Diagnosis) -> dict:
    """Project the config's per-GPU memory (`mtlxray.memory_plan`) on the smallest GPU seen, or
    on the memory plan's cards without GPU; warn when it would not fit."""
    backend, bucket = _backend(cfg)
    n_gpus = max(1, cfg.launch.nodes * cfg.launch.gpus_per_node)
    batch = cfg.data.batch_size
    act = measure_activations(cfg, precision=precision)[0]
    params, trainable = model_params(cfg)
    proj = project(act, batch, backend, n_gpus, params, trainable, **bucket)
    cards = {g["name"]: g["memory_bytes"] for g in seen} or dict(CARDS)
    fits = {}
    for name, cap in cards.items():
        fits[name] = {"capacity_bytes": cap, "fits": proj["total"] <= cap,
                      "max_batch": max_batch(act, cap, backend, n_gpus, params, trainable, **bucket)}
    smallest = min(cards, key=cards.get)
    if seen and not fits[smallest]["fits"]:
        diag.warn(f"memory: projected {proj['total'] / _GiB:.1f} GiB per GPU at data.batch_size={batch} "
                  f"({backend}, {cfg.model.grad_checkpoint} checkpointing), more than {smallest}'s "
                  f"{cards[smallest] / _GiB:.1f} GiB; about {fits[smallest]['max_batch']} images per GPU fit "
                  "(a projection: see benchmarks/README.md, Memory plan)")
    return {"label": "PROJECTION (not a measurement)", "backend": backend, "gpus": n_gpus, "batch": batch,
            "precision": precision, "grad_checkpoint": cfg.model.grad_checkpoint,
            "activation_bytes_per_image": act.per_image(), "params": params, "trainable": trainable,
            **{f"{k}_bytes": v for k, v in proj.items()}, "cards": fits}


# ---------------------------------------------------------------------------------------------
# the diagnosis


def diagnose(cfg=None) -> Diagnosis:
    """Everything `doctor` reports, for `cfg` (a loaded Config) or for the node alone."""
    diag = Diagnosis()
    diag.sections["versions"] = versions()
    seen = cuda_devices()
    diag.sections["gpus"] = seen
    diag.sections["slurm"] = slurm_env()
    if cfg is None:
        free = shutil.disk_usage(Path.cwd()).free
        diag.sections["disk"] = {"checked": str(Path.cwd()), "free_bytes": free}
        return diag

    device = torch.device("cuda" if seen else "cpu")
    wanted = cfg.launch.gpus_per_node
    if not seen:
        if cfg.launch.executor == "slurm" and wanted > 0:
            diag.warn(f"gpu: none visible here, and the config asks for {wanted} per node "
                      "(launch.gpus_per_node): run doctor on a GPU node (e.g. srun --gpus=1 mtlxray doctor ...)")
    elif len(seen) < wanted and os.environ.get("SLURM_JOB_ID"):
        diag.warn(f"gpu: {len(seen)} visible in this job, the config asks for {wanted} per node")
    precision = resolve_precision(cfg.run.precision, device.type)
    if device.type == "cuda" and precision == "bf16" and not all(g["bf16"] for g in seen):
        diag.error(f"precision: run.precision=bf16 but {', '.join(g['name'] for g in seen if not g['bf16'])} "
                   "has no native bf16 (compute capability < 8.0): use run.precision=fp32")
    elif device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        diag.warn(f"precision: bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}) is "
                  "many times slower than fp32 (run.precision=auto picks fp32 here)")
    # the projection is for a GPU: the one here, else the cards of the memory plan (bf16 unless fp32 is asked for)
    plan_precision = precision if seen else ("fp32" if cfg.run.precision == "fp32" else "bf16")
    diag.sections["run"] = {"config_model": cfg.model.name, "precision_here": precision, "device": device.type,
                            "backend": cfg.run.backend, "grad_checkpoint": cfg.model.grad_checkpoint,
                            "batch_size": cfg.data.batch_size, "img_size": cfg.model.img_size,
                            "attention": resolve_attention(cfg.model.attention, precision, device.type),
                            "attention_config": cfg.model.attention,
                            "attention_measured": attention_choice(precision, device.type).describe(
                                device.type, precision) if cfg.model.attention == "auto" else "as configured",
                            "compile": _compile_verdict(cfg),
                            "workers": resolve_workers(cfg.data.workers,
                                                       augment_in_loader=cfg.data.augment.in_loader,
                                                       device_type=device.type)}

    if cfg.run.backend == "deepspeed":
        try:
            deepspeed_config(cfg)
            diag.sections["deepspeed_ops"] = deepspeed_ops()
        except ConfigError:
            raise
        except ImportError as e:
            diag.error(f"deepspeed: not importable: {e}")

    model = None
    if cfg.model.name == "mtl_swin_unet":
        try:
            model = ours_from_config(cfg)
        except MtlxError as e:  # e.g. a model.encoder_pretrained file that is not there
            diag.error(f"model: {e}")
    if model is not None:
        try:
            rows = probe_sdpa(model, cfg.model.img_size, cfg.data.batch_size, precision, device)
        except Exception as e:  # noqa: BLE001 - report, do not crash the doctor
            rows = []
            diag.warn(f"attention: the SDPA probe failed: {_first_line(str(e))}")
        diag.sections["sdpa"] = rows
        _sdpa_verdicts(cfg, rows, precision, device, diag)

    params = sum(p.numel() for p in model.parameters()) if model is not None else None
    for problem in check_run(cfg):  # what `mtlxray train` would refuse
        diag.error(str(problem))
    diag.sections["shards"] = check_shards(cfg, diag)
    diag.sections["disk"] = check_disk(cfg, params, diag)
    if model is not None:
        try:
            diag.sections["memory"] = check_memory(cfg, plan_precision, seen, diag)
        except Exception as e:  # noqa: BLE001
            diag.warn(f"memory: projection unavailable: {_first_line(str(e))}")
    return diag


def _compile_verdict(cfg) -> str:
    if not cfg.run.compile:
        return "off (eager)"
    if not compiles(cfg):
        return "eager: DeepSpeed runs eager (run.compile applies to DDP)"
    return f"torch.compile (inductor, mode {cfg.run.compile_mode}), forward and loss"


def _sdpa_verdicts(cfg, rows: list[dict], precision: str, device: torch.device, diag: Diagnosis) -> None:
    kernel = resolve_attention(cfg.model.attention, precision, device.type)
    if kernel != "sdpa" or not rows:
        return
    if any(not any(r["accepts"].values()) for r in rows):
        bad = next(r for r in rows if not any(r["accepts"].values()))
        diag.error(f"attention: no SDPA kernel runs the window attention {bad['shape']} in {precision} on "
                   f"{device.type} ({bad['why_not'].get('math', '')}); set model.attention=explicit")
        return
    fused = [k for k in ("flash", "efficient", "cudnn")]
    if device.type == "cuda" and any(not any(r["accepts"][k] for k in fused) for r in rows):
        r = next(r for r in rows if not any(r["accepts"][k] for k in fused))
        diag.warn(f"attention: only SDPA's math kernel runs the window attention {r['shape']} on this GPU "
                  f"(efficient: {r['why_not'].get('efficient', '?')}): slower, and it keeps the N×N "
                  "attention probabilities for backward (the memory plan counts them)")


# ---------------------------------------------------------------------------------------------
# output


def _gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / _GiB:.1f} GiB"


def render(diag: Diagnosis) -> str:
    s = diag.sections
    v = s["versions"]
    lines = ["mtlxray doctor", "",
             f"versions: python {v['python']}, torch {v['torch']}, CUDA (build) {v['cuda_build'] or 'none'}, "
             f"cuDNN {v['cudnn'] or 'none'}, NCCL {v['nccl'] or 'n/a (no GPU)'}, accelerate {v['accelerate']}, "
             f"deepspeed {v['deepspeed']}; CPU {v['cpu_capability']}"]
    if s["gpus"]:
        for g in s["gpus"]:
            lines.append(f"gpu {g['index']}: {g['name']}, {_gib(g['memory_bytes'])}, compute {g['capability']}, "
                         f"bf16 {'yes' if g['bf16'] else 'no'}")
    else:
        lines.append("gpu: no GPU (torch.cuda.is_available() is False): CPU only")
    if "run" in s:
        r = s["run"]
        lines.append(f"run: {r['config_model']}, {r['img_size']}², batch {r['batch_size']} per process, precision "
                     f"here {r['precision_here']} on {r['device']}, backend {r['backend']}, checkpointing "
                     f"{r['grad_checkpoint']}")
        lines.append(f"attention: {r.get('attention_config', 'auto')} -> {r['attention']} "
                     f"({r.get('attention_measured', 'as configured')})")
        lines.append(f"compile: {r['compile']}")
        lines.append("data workers: {} per training process ({})".format(*r["workers"]))
    for row in s.get("sdpa", []):
        acc = ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in row["accepts"].items())
        lines.append(f"sdpa {row['shape']} ({row['mask']}, {row['dtype']}): {acc}")
    if s.get("sdpa"):
        reasons = {}
        for row in s["sdpa"]:
            for k, why in row["why_not"].items():
                reasons.setdefault(k, why)
        for k, why in reasons.items():
            lines.append(f"  {k}: {why}")
    if "deepspeed_ops" in s:
        ops = s["deepspeed_ops"]
        lines.append("deepspeed ops: " + ", ".join(
            f"{o['op']} {'compatible' if o['compatible'] else 'incompatible'}{', installed' if o['installed'] else ''}"
            for o in ops))
    slurm = s["slurm"]
    lines.append("slurm: " + (", ".join(f"{k}={v}" for k, v in slurm.items()) if slurm else "no Slurm variables (not in a job)"))
    if "shards" in s:
        sh = s["shards"]
        parts = [f"{k} {v.get('shards', '?')} shards / {v.get('samples', '?')} samples" + ("" if v.get("ok") else " (problem)")
                 for k, v in sh.get("splits", {}).items()]
        kind = f" ({sh['format']}, {sh['image_size']}px)" if sh.get("format") and sh.get("image_size") else ""
        lines.append(f"shards: {sh['root']}{kind}: " + ("; ".join(parts) if parts else "unreadable (see the verdict)"))
    d = s["disk"]
    need = d.get("checkpoints_need_bytes")
    lines.append(f"disk: {_gib(d['free_bytes'])} free under {d['checked']}"
                 + (f" (checkpoints need about {_gib(need)})" if need else ""))
    if "memory" in s:
        m = s["memory"]
        fits = "; ".join(f"{name} ({_gib(c['capacity_bytes'])}): {'fits' if c['fits'] else 'does NOT fit'}, "
                         f"largest batch ~{c['max_batch']}" for name, c in m["cards"].items())
        lines.append(f"memory (PROJECTION): {_gib(m['total_bytes'])} per GPU at batch {m['batch']} "
                     f"({m['backend']} over {m['gpus']} GPU(s), {m['precision']}, {m['grad_checkpoint']} checkpointing; "
                     f"activations {_gib(m['activations_bytes'])}, model state {_gib(m['state_bytes'])}); {fits}")
    lines.append("")
    if not diag.problems:
        lines.append("verdict: OK: no problems found" + ("" if "run" in s else " (no --config: node checks only)"))
    for p in diag.problems:
        lines.append(f"verdict: {p.level.upper()}: {p.text}")
    errors = sum(p.level == "error" for p in diag.problems)
    lines.append(f"doctor: {errors} error(s), {len(diag.problems) - errors} warning(s): "
                 + ("the config can run here" if diag.ok else "the config cannot run here"))
    return "\n".join(lines)
