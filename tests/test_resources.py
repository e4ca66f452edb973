"""mtlxray.resources: shipped configs by name from any directory, a path winning over a name; this process's
/proc/self/status fields."""

import pytest

from mtlxray import cli
from mtlxray.config import config_to_dict, load_config
from mtlxray.errors import ConfigError
from mtlxray.resources import configs_dir, find_config, shipped_configs


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory: no configs/ beside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["phase1", "baselines/unet", "multichexnet/4_alternating", "phase1.yaml",
                                  "configs/phase1.yaml"])
def test_a_shipped_config_loads_by_name_from_any_directory(elsewhere, name):
    stem = name.removeprefix("configs/").removesuffix(".yaml")
    assert config_to_dict(load_config(name)) == config_to_dict(load_config(configs_dir() / f"{stem}.yaml"))


def test_extends_between_shipped_configs_follows_the_chain_by_name(elsewhere):
    # multichexnet/4_alternating -> base.yaml -> ../demo.yaml, all inside the shipped folder
    cfg = load_config("multichexnet/4_alternating")
    assert cfg.model.embed_dim == load_config("demo").model.embed_dim == 24
    assert [s.name for s in cfg.data.sources]


def test_a_file_in_the_working_directory_wins_over_a_shipped_name(elsewhere):
    (elsewhere / "phase1").write_text("run: {name: mine}\n")
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "phase2.yaml").write_text("extends: phase1\nrun: {name: local-phase2}\n")
    assert load_config("phase1").run.name == "mine"
    # configs/phase2.yaml is a path here; its `extends: phase1` finds no phase1 beside it, so the shipped one
    local = load_config("configs/phase2.yaml")
    assert local.run.name == "local-phase2"
    assert local.phase.name == load_config(configs_dir() / "phase1.yaml").phase.name == "phase1"


def test_a_users_config_extends_a_shipped_one_by_name_and_a_file_beside_it_wins(elsewhere):
    (elsewhere / "mine.yaml").write_text("extends: phase2.yaml\noptim: {lr: 1.0e-5}\n")
    cfg = load_config("mine.yaml")
    assert cfg.optim.lr == 1e-5 and cfg.phase.name == "phase2"
    (elsewhere / "phase2.yaml").write_text("run: {name: beside}\n")
    assert load_config("mine.yaml").run.name == "beside"


def test_an_unknown_name_is_a_config_error_naming_the_closest_shipped_config(elsewhere):
    with pytest.raises(ConfigError, match=r"phase3 is neither a file nor the name of a shipped config "
                                          r"\(did you mean `phase2`\?\)"):
        load_config("phase3")
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        find_config("/no/such.yaml")


def test_a_name_with_another_suffix_is_not_that_config(elsewhere):
    with pytest.raises(ConfigError, match="deepspeed/zero2.yaml is neither"):
        find_config("deepspeed/zero2.yaml")
    zero2 = configs_dir() / "deepspeed" / "zero2.json"
    assert find_config("deepspeed/zero2.json") == find_config("deepspeed/zero2") == zero2


def test_the_deepspeed_config_is_found_by_name_too(elsewhere):
    from mtlxray.train.accelerator import deepspeed_config

    cfg = load_config("phase1", ["run.backend=deepspeed", "run.deepspeed_config=deepspeed/zero2"])
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 2


def test_config_list_prints_every_shipped_config_by_name(elsewhere, capsys):
    assert cli.main(["config", "list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == list(shipped_configs()) and str(configs_dir()) in out.splitlines()[0]
    assert {"phase1", "phase2", "demo", "baselines/unet", "multichexnet/4_alternating", "deepspeed/zero2"} <= set(names)
    assert "phase1  " in out and "Phase 1 of the paper" in out


def test_config_show_takes_a_name(elsewhere, capsys):
    assert cli.main(["config", "show", "--config", "baselines/unet", "data.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "name: unet" in out and "batch_size: 3" in out


def test_proc_status_reads_one_field_of_this_process():
    import os

    from mtlxray.resources import proc_status, proc_status_kib

    mask = os.umask(0o027)
    try:
        assert int(proc_status("Umask"), 8) == 0o027
    finally:
        os.umask(mask)
    assert proc_status_kib("VmHWM") >= proc_status_kib("VmRSS") > 0
    assert proc_status("NoSuchField") is None
    with pytest.raises(RuntimeError, match="NoSuchField missing"):
        proc_status_kib("NoSuchField")
