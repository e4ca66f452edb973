"""A chain of phases is planned and checked before anything is submitted (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtlxray.cli import build_parser, main
from mtlxray.errors import ConfigError, ShardError
from mtlxray.launch.chain import plan_chain, validate_chain

DEMO = ["configs/demo.yaml", "configs/demo_phase2.yaml"]


def test_plan_chains_any_number_of_phases_each_from_the_previous_best(demo_overrides, third_phase, tmp_path):
    runs = tmp_path / "runs"
    plans = validate_chain([*DEMO, third_phase], demo_overrides(runs, 2))
    assert [p.run_dir for p in plans] == [runs / "phase1", runs / "phase2", runs / "phase3"]
    assert plans[0].cfg.phase.init_from is None
    assert plans[1].cfg.phase.init_from == str(runs / "phase1" / "checkpoints" / "best")
    assert plans[2].cfg.phase.init_from == str(runs / "phase2" / "checkpoints" / "best")


def test_phase_overrides_reach_only_their_phase(demo_overrides, tmp_path):
    plans = plan_chain(DEMO, demo_overrides(tmp_path, 2), {2: ["optim.lr=0.5"]})
    assert plans[0].cfg.optim.lr != 0.5 and plans[1].cfg.optim.lr == 0.5
    with pytest.raises(ConfigError, match="phase 3"):
        plan_chain(DEMO, demo_overrides(tmp_path, 2), {3: ["optim.lr=0.5"]})


def test_a_chain_of_shipped_config_names_plans_from_any_directory(tmp_path, monkeypatch):
    from mtlxray.resources import shipped_config

    monkeypatch.chdir(tmp_path)  # no configs/ here: the names are the package's configs
    plans = plan_chain(["demo", "demo_phase2"], [f"run.output_dir={tmp_path}"])
    # the jobs get the files themselves, whatever their working directory
    assert [p.config for p in plans] == [str(shipped_config("demo").resolve()),
                                         str(shipped_config("demo_phase2").resolve())]
    assert plans[1].cfg.phase.init_from == str(tmp_path / "phase1" / "checkpoints" / "best")
    with pytest.raises(ConfigError, match=r"phase 2 \(demo_phase3\): config not found: demo_phase3 is neither"):
        plan_chain(["demo", "demo_phase3"])


def test_missing_shards_of_a_later_phase_are_refused(demo_overrides, tmp_path):
    with pytest.raises(ShardError, match=r"phase 2 \(demo_phase2.yaml\): data.shards: .*missing"):
        validate_chain(DEMO, demo_overrides(tmp_path, 2), {2: [f"data.shards={tmp_path / 'missing'}"]})


def test_init_from_must_exist_or_come_from_an_earlier_phase(demo_overrides, tmp_path):
    # Alone, phase 2's init_from (phase 1's best) does not exist yet.
    with pytest.raises(ConfigError, match=r"phase 1 \(demo_phase2.yaml\): phase.init_from: .*no earlier phase"):
        validate_chain(DEMO[1:], demo_overrides(tmp_path, 2))
    # An existing checkpoint is fine.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    validate_chain(DEMO[1:], [*demo_overrides(tmp_path, 2), f"phase.init_from={ckpt}"])


def test_two_phases_writing_one_run_folder_are_refused(demo_overrides, tmp_path):
    with pytest.raises(ConfigError, match="both write .*run.name"):
        validate_chain([DEMO[0], DEMO[0]], demo_overrides(tmp_path, 2))


def test_chain_module_prints_the_plan_for_pipeline_sh(demo_overrides, third_phase, tmp_path):
    over = " ".join(demo_overrides(tmp_path, 2))
    res = subprocess.run([sys.executable, "-m", "mtlxray.cli.chain", "--overrides", over,
                          "--phase-overrides", "3", "optim.lr=0.5", *DEMO, str(third_phase)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    assert [(k, run) for k, _, run, _ in lines] == [("1", str(tmp_path / "phase1")), ("2", str(tmp_path / "phase2")),
                                                    ("3", str(tmp_path / "phase3"))]
    assert lines[2][3].endswith(f"optim.lr=0.5 phase.init_from={tmp_path / 'phase2' / 'checkpoints' / 'best'}")
    bad = subprocess.run([sys.executable, "-m", "mtlxray.cli.chain", "--overrides", over, DEMO[1]],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: phase 1")


def test_submit_dry_run_prints_every_job_and_submits_nothing(demo_overrides, third_phase, tmp_path, capsys):
    rc = main(["submit", "--config", DEMO[0], "--then", DEMO[1], "--then", str(third_phase), "--executor", "slurm",
               "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "3", "--mem", "6G", "--time", "1:30:00",
               "--partition", "debug", "--account", "proj", "--qos", "normal", "--folder", str(tmp_path / "s"),
               "--dry-run", *demo_overrides(tmp_path / "runs", 2)])
    out = capsys.readouterr().out
    assert rc == 0
    jobs = [line.split() for line in out.splitlines() if line.startswith("sbatch ")]
    assert len(jobs) == 3
    for k, flags in enumerate(jobs, start=1):
        assert {"--partition=debug", "--account=proj", "--qos=normal", "--nodes=2", "--ntasks-per-node=1",
                "--cpus-per-task=3", "--mem=6GB", "--time=90", f"--job-name=mtlx-phase{k}"} <= set(flags)
        assert not any(f.startswith("--gpus") for f in flags)
        assert (f"--dependency=afterok:<phase{k - 1}>" in flags) == (k > 1)
    assert not (tmp_path / "s").exists() and not (tmp_path / "runs").exists()


def test_submit_rejects_conflicting_time_limits(demo_overrides, tmp_path, capsys):
    rc = main(["submit", "--config", DEMO[0], "--time", "10", "--timeout-min", "10", "--dry-run",
               *demo_overrides(tmp_path, 2)])
    assert rc == 2 and "give --time or --timeout-min" in capsys.readouterr().err


def test_every_submit_option_has_help():
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "submit")[1]
    missing = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert not missing
    for flag in ("--account", "--qos", "--cpus-per-task", "--mem", "--time", "--dry-run", "--then", "--wait"):
        assert flag in sub.format_help()
