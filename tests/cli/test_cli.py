"""The `mtlxray` command line: every subcommand documents itself and resolves to its handler."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mtlxray
from mtlxray import cli
from mtlxray.resources import source_checkout

REPO = Path(__file__).resolve().parents[2]


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, handler) of every runnable subcommand, nested ones included."""
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.get_default("handler"):
                    yield (*prefix, name), sub.get_default("handler")
                yield from _subcommands(sub, (*prefix, name))


SUBCOMMANDS = sorted(_subcommands(cli.build_parser()), key=lambda item: item[0])


def test_the_documented_commands_are_all_there():
    words = {" ".join(w) for w, _ in SUBCOMMANDS}
    assert {"config list", "config show", "synth", "shards build", "shards info", "shards audit", "model-summary",
            "train", "evaluate", "predict", "export", "submit", "demo", "bench", "doctor", "compare",
            "slurm-scripts"} <= words


@pytest.mark.parametrize("words", [w for w, _ in SUBCOMMANDS], ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mtlxray " + " ".join(words))
    assert len(out.splitlines()) > 4  # a description beyond the usage line


def _parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) of every subcommand, nested ones and groups included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _parsers(sub, (*prefix, name))


def test_every_option_of_every_subcommand_says_what_it_does():
    bare = [f"{' '.join(words)} {a.option_strings[-1]}" for words, sub in _parsers(cli.build_parser())
            for a in sub._actions if a.option_strings and not a.help]
    assert not bare, f"options without a help text: {bare}"


def test_only_commands_that_can_exit_75_say_so_in_their_help():
    for words, sub in _parsers(cli.build_parser()):
        text = sub.format_help()
        if words == ("train",):
            assert "75" in text and "requeue" in text
        else:
            assert "75 saved" not in text and "wants a requeue" not in text, " ".join(words)


@pytest.mark.parametrize("words,handler", SUBCOMMANDS, ids=[" ".join(w) for w, _ in SUBCOMMANDS])
def test_every_handler_is_a_function_of_the_cli_package(words, handler):
    assert callable(handler) and handler.__module__.startswith("mtlxray.cli.")


def test_top_level_help_lists_all_commands():
    r = subprocess.run([sys.executable, "-m", "mtlxray.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for words, _ in SUBCOMMANDS:
        assert words[0] in r.stdout


def test_version_names_the_commit_when_run_from_a_checkout():
    r = subprocess.run([sys.executable, "-m", "mtlxray.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0
    root = source_checkout()
    if root is None:  # an installed package: the version alone (tests/test_packaging.py checks the wheel's)
        assert r.stdout.strip() == f"mtlxray {mtlxray.__version__}"
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert re.fullmatch(rf"mtlxray {re.escape(mtlxray.__version__)} \(git {head[:12]}(-dirty)?\)\n", r.stdout)


def test_a_shard_root_without_a_manifest_exits_2_from_every_command(tmp_path, capsys):
    """One exit code for one kind of error: shards that are not there are a usage error (2), as
    `train` has always said, in `submit`, `evaluate` and `shards info` too."""
    from mtlxray.config import load_config
    from mtlxray.errors import MtlxError
    from mtlxray.train.trainer import preflight

    demo = str(REPO / "configs" / "demo.yaml")
    (tmp_path / "empty").mkdir()
    for shards in (tmp_path / "none", tmp_path / "empty"):
        codes = {
            "shards info": cli.main(["shards", "info", str(shards)]),
            "submit": cli.main(["submit", "--config", demo, f"data.shards={shards}", f"run.output_dir={tmp_path}",
                                "--executor", "local", "--dry-run"]),
        }
        if shards.name == "empty":  # (it builds a model first: once is enough)
            codes["evaluate"] = cli.main(["evaluate", "--model-config", demo, "--shards", str(shards), "--out",
                                          str(tmp_path / "eval")])
        with pytest.raises(MtlxError) as train_error:  # `train`'s check before any worker starts
            preflight(load_config(demo, [f"data.shards={shards}"]), None)
        codes["train"] = train_error.value.exit_code
        assert codes == dict.fromkeys(codes, 2), (shards, codes)
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == len(codes) - 1 and all(str(shards) in line for line in errors), errors
    assert not (tmp_path / "eval").exists()


LIBRARY_LINES = """
import logging, sys
from mtlxray import cli
from mtlxray.cli import config

def handler(args):
    logging.getLogger("onnx_ir.passes.common").info("Removed 1 unused nodes")  # ONNX export's passes
    logging.getLogger("faster_coco_eval.core.cocoeval").info("Average Precision (AP) @[ IoU=0.50 ]")
    logging.warning("No pretrained weights loaded for model 'RN50'. Model initialized randomly.")  # open_clip
    logging.getLogger("accelerate.utils").warning("a library warning")
    logging.getLogger("mtlxray.report.export").info("onnx export written")
    return 0

config.config_list = handler
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_info_lines_are_hidden_unless_verbose(verbose):
    res = subprocess.run([sys.executable, "-c", LIBRARY_LINES, *(["-v"] if verbose else []), "config", "list"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "onnx export written" in res.stderr and "a library warning" in res.stderr
    hidden = ["Removed 1 unused nodes", "Average Precision", "Model initialized randomly"]
    assert [line in res.stderr for line in hidden] == [verbose] * 3
