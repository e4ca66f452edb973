"""Typed configs: YAML loading, `extends:` inheritance, dotted overrides, and loud errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from mtlxray.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_extends_merges_nested_keys_and_child_wins(tmp_path):
    _write(tmp_path, "base.yaml", "optim: {lr: 0.1, weight_decay: 0.5}\nrun: {name: base}\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.2
    assert cfg.optim.weight_decay == 0.5  # inherited
    assert cfg.run.name == "base"


def test_phase2_inherits_phase1_and_overrides_phase():
    cfg = load_config(ROOT / "configs/phase2.yaml")
    assert cfg.phase.name == "phase2"
    assert cfg.phase.frozen == []
    assert cfg.phase.loss_weights == {"lung": 1.0, "inf": 1.0, "cls": 0.3}
    assert cfg.phase.lr_mult["inf_decoder"] == 5.0 and cfg.phase.lr_mult["default"] == 0.1
    assert cfg.data.subset == "infection"
    assert cfg.optim.weight_decay == 0.01  # from phase1.yaml
    assert cfg.schedule.epochs == 30


def test_dotted_overrides_are_parsed_as_yaml_values():
    cfg = load_config(ROOT / "configs/phase1.yaml",
                      ["optim.lr=3e-4", "model.depths=[1,1,2,1]", "run.name=x", "schedule.max_steps=5"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.depths == [1, 1, 2, 1]
    assert cfg.run.name == "x"
    assert cfg.schedule.max_steps == 5


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    p = _write(tmp_path, "bad.yaml", "optim: {lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and str(p) in msg
    assert "allowed keys" in msg and "weight_decay" in msg


def test_unknown_top_level_section(tmp_path):
    p = _write(tmp_path, "bad.yaml", "optimizer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown key `optimizer`.*did you mean `optim`"):
        load_config(p)


@pytest.mark.parametrize("text, key", [
    ("optim: {lr: fast}\n", "optim.lr"),
    ("data: {batch_size: 2.5}\n", "data.batch_size"),
    ("model: {depths: 4}\n", "model.depths"),
    ("run: {precision: fp8}\n", "run.precision"),
    ("data: {augment: {enabled: 3}}\n", "data.augment.enabled"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    p = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_validation_in_post_init(tmp_path):
    p = _write(tmp_path, "bad.yaml", "model: {depths: [2, 2], num_heads: [3, 6, 12]}\n")
    with pytest.raises(ConfigError, match="same length"):
        load_config(p)


def test_circular_extends_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/phase2.yaml", ["optim.lr=0.5"])
    p = _write(tmp_path, "dumped.yaml", dump_config(cfg))
    assert load_config(p) == cfg


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mtlxray.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_config_show_applies_override():
    r = _cli("config", "show", "--config", "configs/phase1.yaml", "optim.lr=3e-4")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.0003" in r.stdout


def test_cli_config_show_unknown_key_exits_nonzero_with_suggestion():
    r = _cli("config", "show", "--config", "configs/phase1.yaml", "optim.lrr=1")
    assert r.returncode != 0
    assert "optim.lrr" in r.stderr and "did you mean `optim.lr`" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override, words", [
    ("data.augment.scale=1.0", "data.augment.scale must be < 1"),  # a zoom factor reaching 0
    ("data.augment.contrast=1.5", "data.augment.contrast must be < 1"),  # an inverted contrast
    ("data.augment.rotate_deg=.nan", "data.augment.rotate_deg must be a finite number"),
    ("data.augment.translate=.inf", "data.augment.translate must be a finite number"),
    ("schedule.min_lr=1e-3", "schedule.min_lr=0.001 is above optim.lr=0.0001"),
    ("run.name=' '", "run.name must be a plain folder name"),
    ("run.output_dir=''", "run.output_dir is empty"),
    ("data.fraction_seed=-1", "data.fraction_seed must be >= 0"),
    ("run.seed=4294967296", "run.seed must be in [0, 2^32)"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate must be in [0, 1)"),
    ("model.mlp_ratio=.inf", "model.mlp_ratio must be a finite number > 0"),
    ("model.ppm_bins=[0,2]", "model.ppm_bins must be a non-empty list of numbers >= 1"),
    ("model.decoder_channels=[384,0,96,48]", "model.decoder_channels must be a non-empty list"),
    ("model.ppm_channels=0", "model.ppm_channels must be >= 1"),
    ("model.depths=[2,-1,6,2]", "model.depths must be a non-empty list of numbers >= 0"),
    ("model.num_heads=[3,0,12,24]", "model.num_heads must be a non-empty list of numbers >= 1"),
    ("model.num_heads=[3,5,12,24]", "model.num_heads[1]=5 does not divide stage 1's width"),
    ("model.cross_attn_heads=[8,5,2,1]", "model.cross_attn_heads[1]=5 does not divide model.decoder_channels[1]=192"),
    ("model.in_chans=3", "model.in_chans must be 1"),
    ("data.workers=-1", "data.workers must be auto or an integer >= 0, got -1"),
    ("data.workers=four", "`data.workers` expects int or 'auto', got 'four' (str)"),
    ("data.workers=2.5", "`data.workers` expects int or 'auto', got 2.5 (float)"),
    ("data.workers=true", "`data.workers` expects int or 'auto', got True (bool)"),
])
def test_values_that_would_misbehave_later_are_refused_at_load_in_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_data_workers_takes_a_count_or_auto_and_nothing_else():
    from mtlxray.config import DataConfig

    assert load_config(None, ["data.workers=auto"]).data.workers == "auto"
    assert load_config(None, ["data.workers=3"]).data.workers == 3
    assert DataConfig().workers == "auto"
    with pytest.raises(ConfigError, match="data.workers must be auto or an integer >= 0, got 'Auto'"):
        DataConfig(workers="Auto")  # built in code, past the YAML type check
