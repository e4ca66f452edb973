"""The installable package: the sdist builds the same wheel as the tree, and the installed wheel runs
the demo, the shipped configs and the sbatch scripts from an empty directory, with no source tree on
its path.

Nothing is downloaded: the wheel is built with the test environment's setuptools and installed
without dependencies into a venv that reads the test environment's packages (a .pth line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mtlxray

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="builds from a git checkout's files")


def _tree_copy(dest: Path) -> Path:
    """The files a clone has (tracked, and new ones not ignored): no build/, egg-info or venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _run(args: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _build_wheel(source: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", out, source], cwd=source.parent)
    (wheel,) = out.glob("mtlxray-*.whl")
    return wheel


def _expected_files() -> set[str]:
    """What the wheel must hold besides its metadata: every module, every config, every sbatch script."""
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mtlxray").rglob("*.py")}
    files |= {f"mtlxray/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "configs").rglob("*") if p.is_file()}
    files |= {f"mtlxray/slurm/{p.name}" for p in (ROOT / "slurm").glob("*.sh")}
    return files | {"mtlxray/py.typed"}


def _contents(wheel: Path) -> dict[str, bytes]:
    """Every file of a wheel but its RECORD (which lists the others' hashes)."""
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(name) for name in z.namelist() if not name.endswith(".dist-info/RECORD")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the sdist (as `pip install mtlxray-X.tar.gz` would), checked against the tree's."""
    tmp = tmp_path_factory.mktemp("build")
    tree = _tree_copy(tmp / "tree")
    from_tree = _build_wheel(tree, tmp / "from-tree")
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
          tmp / "sdist"], cwd=tree)
    (sdist,) = (tmp / "sdist").glob("mtlxray-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    assert (unpacked / "CHANGELOG.md").is_file() and (unpacked / "LICENSE").is_file()
    from_sdist = _build_wheel(unpacked, tmp / "from-sdist")
    assert from_sdist.name == from_tree.name == f"mtlxray-{mtlxray.__version__}-py3-none-any.whl"
    assert _contents(from_sdist) == _contents(from_tree)
    return from_sdist


def test_the_wheel_holds_every_module_config_and_script_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"mtlxray-{mtlxray.__version__}.dist-info"
    assert {n for n in names if not n.startswith(dist_info)} == _expected_files()
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {mtlxray.__version__}\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata


@pytest.mark.slow
def test_the_installed_wheel_runs_configs_demo_and_sbatch_scripts_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    # The test environment's packages (torch, ...) after the venv's own: plain path lines, so that
    # no .pth of theirs runs (an editable mtlxray would put the source tree back on the path).
    (purelib / "test-env.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def mtlxray_(*args: str) -> str:
        return _run(["mtlxray", *args], cwd=empty, env=env).stdout

    installed = Path(_run([python, "-c", "import mtlxray; print(mtlxray.__file__)"], cwd=empty, env=env).stdout.strip())
    assert installed == purelib / "mtlxray" / "__init__.py"
    assert mtlxray_("--version") == f"mtlxray {mtlxray.__version__}\n"  # no checkout: no commit

    listing = mtlxray_("config", "list")
    assert str(purelib / "mtlxray" / "configs") in listing.splitlines()[0]
    listed = {line.split()[0] for line in listing.splitlines()[1:]}
    assert {"phase1", "phase2", "demo", "baselines/unet", "multichexnet/4_alternating", "deepspeed/zero2"} <= listed
    assert "name: phase1" in mtlxray_("config", "show", "--config", "phase1")
    assert "name: 4_alternating" in mtlxray_("config", "show", "--config", "multichexnet/4_alternating")

    scripts = empty / "scripts"
    written = mtlxray_("slurm-scripts", "--out", "scripts").split()
    assert written == [str(scripts / name) for name in ("phase1.sh", "phase2.sh", "pipeline.sh", "train.sh")]
    for script in written:
        _run(["bash", "-n", script], cwd=empty)
    assert f"venv=${{MTLX_VENV:-{venv}}}" in (scripts / "train.sh").read_text()

    out = mtlxray_("demo", "--scale", "tiny", "--bootstrap", "20", "--out", "demo")
    report = empty / "demo" / "report.md"
    assert out.rstrip().endswith(f"report: {report}")
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert re.search(r"^ +phase1: step \d+/\d+ \(\d+%\), loss .*, ETA ", out, re.M)  # training relayed
    assert re.search(r"^ +phase2: step \d+/\d+ ", out, re.M)
    text = report.read_text()
    for heading in ("What the demo scales down", "Table I", "Table II", "## Training",
                    "Evaluation: lung subset", "Evaluation: infection subset", "Predictions on test images"):
        assert heading in text, heading
    assert "| model.img_size | 256 | 64 |" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "loss_curves.png" in images and "eval-lung/overlays.png" in images
    for rel in images:
        assert (report.parent / rel).is_file(), rel
    preds = [json.loads(line) for line in (report.parent / "predict" / "predictions.jsonl").read_text().splitlines()]
    manifest = json.loads((report.parent / "shards" / "manifest.json").read_text())
    # up to two test images per class of the infection subset
    assert len(preds) == sum(min(2, n) for n in manifest["counts"]["infection"]["test"].values())
    assert (report.parent / "predict" / "predictions.csv").is_file()
