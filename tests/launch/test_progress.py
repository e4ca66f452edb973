"""A waiting `submit_pipeline` relays its running job's progress (a real local submitit job)."""

from __future__ import annotations

import json
import re

from mtlxray.launch import submit_pipeline

TRAIN_LINE = re.compile(r"^phase1: step (\d+)/4 \(\d+%\), loss \d+\.\d{4}, "
                        r"elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|--)$")


def test_waiting_relays_each_new_log_step_once_while_the_local_job_runs(demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    (runs / "phase1").mkdir(parents=True)
    # a line an earlier job left in the run folder: not news, and not shown
    (runs / "phase1" / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 0, "val/loss": 9.0}) + "\n")
    relayed: list[tuple[str, bool]] = []
    pipeline = submit_pipeline(["configs/demo.yaml"], executor="local", folder=tmp_path / "submitit",
                               overrides=[*demo_overrides(runs, 4), "run.eval_every=2"], relay_every_s=0.1,
                               relay=lambda line: relayed.append((line, pipeline.phases[0].job.done())))
    (report,) = pipeline.wait()
    assert report.state == "COMPLETED", report
    lines = [line for line, _ in relayed]
    train = [TRAIN_LINE.match(line) for line in lines if " validation: " not in line]
    assert all(train), lines
    assert [int(m.group(1)) for m in train] == [1, 2, 3, 4]  # each log step once, in order
    assert [line.split(" validation: ")[0] for line in lines if " validation: " in line] == \
        ["phase1: step 2", "phase1: step 4"]
    assert "val/loss" in lines[-1] and "9.0000" not in "".join(lines)
    assert any(not done for _, done in relayed)  # relayed while the job ran, not only at its end


def test_a_resumed_run_rewriting_its_metrics_shows_no_step_twice(tmp_path):
    from mtlxray.io import write_text_atomic
    from mtlxray.launch.progress import ProgressRelay

    metrics = tmp_path / "metrics.jsonl"

    def line(step: int) -> str:
        return json.dumps({"type": "train", "step": step, "total_steps": 4, "loss": 0.5, "time": 100.0 + step}) + "\n"

    shown: list[str] = []
    relay = ProgressRelay(metrics, "p", shown.append, clock=lambda: 100.0)
    relay.start()
    metrics.write_text(line(1) + line(2) + line(3)[:10])  # step 3 still being written
    relay.poll()
    write_text_atomic(metrics, line(1) + line(2))  # resumed from step 2: lines after it dropped
    relay.poll()
    with metrics.open("a") as f:
        f.write(line(3) + line(4))
    relay.poll()
    relay.poll()
    assert [s.split(",")[0] for s in shown] == ["p: step 1/4 (25%)", "p: step 2/4 (50%)", "p: step 3/4 (75%)",
                                                "p: step 4/4 (100%)"]
    assert shown[-1].endswith("elapsed 0:00:04, ETA 0:00:00") and shown[1].endswith("ETA 0:00:02")
