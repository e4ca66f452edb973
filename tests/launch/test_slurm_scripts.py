"""mtlxray.launch.scripts: `mtlxray slurm-scripts` writes sbatch scripts that run outside a checkout.

The copies run from another submit folder against stand-ins for train.sh and the venv's activate, so
what is checked is where each script looks, not Slurm (tests/launch/test_scripts.py runs the
repository's scripts on a real cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mtlxray import cli
from mtlxray.launch.scripts import SCRIPTS, write_slurm_scripts
from mtlxray.resources import slurm_dir


def _bash(script: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MTLX_"))}
    return subprocess.run(["bash", str(script)], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


def test_the_written_scripts_are_the_packages_with_their_defaults_set(tmp_path, capsys):
    out = tmp_path / "scripts"
    assert cli.main(["slurm-scripts", "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / name) for name in SCRIPTS]
    assert (out / "runs").is_dir()  # the phase scripts' #SBATCH --output=runs/slurm-%j.out
    for name in SCRIPTS:
        written, shipped = (out / name).read_text(), (slurm_dir() / name).read_text()
        assert os.access(out / name, os.X_OK)
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0
        # the same script below the added header, but for the lines that set where things are
        changed = set(written.splitlines()) - set(shipped.splitlines())
        assert all(line.startswith(("# ", "scripts=", "venv=")) for line in changed), changed
        assert written.splitlines()[1].startswith("# Written by `mtlxray slurm-scripts`")
    if sys.prefix != sys.base_prefix:  # run from a venv: the jobs activate it by default
        assert f"venv=${{MTLX_VENV:-{sys.prefix}}}" in (out / "train.sh").read_text()


def test_a_phase_script_runs_its_own_train_sh_from_another_submit_folder(tmp_path):
    out = tmp_path / "scripts"
    write_slurm_scripts(out)
    (out / "train.sh").write_text('echo "train.sh of $(dirname "$0") config=$MTLX_CONFIG args=$*"\n')
    submit = tmp_path / "submit"
    submit.mkdir()
    res = _bash(out / "phase2.sh", submit, SLURM_SUBMIT_DIR=str(submit))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"train.sh of {out} config=configs/phase2.yaml args="


def test_train_sh_activates_the_venv_it_was_written_for_unless_mtlx_venv_is_set(tmp_path):
    venv, other = tmp_path / "venv", tmp_path / "other"
    for folder in (venv, other):
        (folder / "bin").mkdir(parents=True)
        # a stand-in activate that ends the job right there, saying which one ran
        (folder / "bin" / "activate").write_text(f'echo "activated {folder.name}"; exit 7\n')
    out = tmp_path / "scripts"
    write_slurm_scripts(out, venv)
    assert (res := _bash(out / "train.sh", tmp_path)).returncode == 7 and res.stdout == "activated venv\n"
    assert _bash(out / "train.sh", tmp_path, MTLX_VENV=str(other)).stdout == "activated other\n"
