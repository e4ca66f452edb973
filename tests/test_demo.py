"""The demo's report and configs (tests/test_packaging.py runs `mtlxray demo --scale tiny` end to end from an
installed wheel)."""


def test_the_report_names_the_gpu_and_its_precision_when_training_ran_there(monkeypatch):
    import torch

    from mtlxray.config import load_config
    from mtlxray.demo import training_platform

    cfg = load_config("demo")
    cpu = training_platform(cfg)
    assert cpu.startswith("on CPU (") and ("training in fp32" in cpu or "training in bf16" in cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = training_platform(cfg)
    assert gpu.startswith("on NVIDIA H200 (training in bf16, torch ") and "CPU" not in gpu


def _demo_and_paper_phases():
    from mtlxray.config import load_config

    return [(load_config("phase1"), load_config("demo")), (load_config("phase2"), load_config("demo_phase2"))]


def test_the_report_lists_each_augmentation_setting_the_demo_changes():
    from mtlxray.data.manifest import Manifest
    from mtlxray.demo import _scaled_down_rows

    phases = _demo_and_paper_phases()
    (paper, demo), _ = phases
    assert not demo.data.augment.enabled and paper.data.augment.enabled
    rows = _scaled_down_rows(phases, Manifest(format="raw", image_size=256, shards={}))
    assert ["data.augment.enabled", "True", "False"] in rows
    assert not any(row[0] == "data.augment" for row in rows)  # one row per setting, not the whole block
    assert ["model.img_size", "256", "128"] in rows


def test_the_report_lists_the_phase2_settings_the_demo_changes_once():
    from mtlxray.data.manifest import Manifest
    from mtlxray.demo import _scaled_down_rows

    rows = _scaled_down_rows(_demo_and_paper_phases(), Manifest(format="raw", image_size=256, shards={}))
    names = [row[0] for row in rows]
    assert ["schedule.epochs (phase 2)", "30", "16"] in rows
    assert ["data.batch_size (phase 2)", "16", "8"] in rows
    assert "phase.loss_weights (phase 2)" in names and "phase.loss_weights" in names
    # Phase 2 repeats phase 1's departures from the paper for the model and the warmup (0 -> 10):
    # one row each, not two.
    assert "model.img_size (phase 2)" not in names and names.count("model.img_size") == 1
    assert ["schedule.warmup_steps", "0", "10"] in rows and "schedule.warmup_steps (phase 2)" not in names
    assert not any(name.startswith("phase.init_from") for name in names)


def test_the_demo_decodes_its_batches_in_the_training_process():
    # On the demo's 2 cores a loader process competes with the compute threads (docs/demo.md).
    from mtlxray.config import load_config
    from mtlxray.demo import phase2_config_of
    from mtlxray.resources import shipped_config

    phase1 = shipped_config("demo")
    for path in (phase1, phase2_config_of(phase1)):
        assert load_config(path).data.workers == 0, path


def test_the_training_table_shows_the_steps_trained_and_a_checkpoint_path_relative_to_the_report(tmp_path):
    import json
    from types import SimpleNamespace

    from mtlxray.checkpoint import TrainState
    from mtlxray.config import dump_config, load_config
    from mtlxray.demo import _phase_rows
    run = tmp_path / "phase1"
    best = run / "checkpoints" / "step-20"
    best.mkdir(parents=True)
    (best / "state.json").write_text(TrainState(step=20, phase="phase1", best_metric=0.5).to_json())
    (run / "config.yaml").write_text(dump_config(load_config("demo")))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"type": "train", "step": s}) + "\n" for s in (10, 20, 30)))
    report = SimpleNamespace(state="COMPLETED", run_dir=str(run), best_checkpoint=str(best))  # a PhaseReport
    (row,) = _phase_rows([report], tmp_path)
    assert row[2:4] == [30, 20]  # steps trained, then the best checkpoint's step
    assert row[-1] == "`phase1/checkpoints/step-20`"
