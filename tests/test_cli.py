"""The `mtlxray` command line: every subcommand documents itself; unbuilt ones say so and exit 2."""

import argparse
import subprocess
import sys

import pytest

from mtlxray import cli

SUBCOMMANDS = [
    ["config", "show"], ["synth"], ["shards", "build"], ["shards", "info"], ["shards", "audit"], ["model-summary"], ["train"],
    ["evaluate"], ["predict"], ["export"], ["submit"], ["demo"], ["bench"],
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mtlxray " + " ".join(words))
    # a description beyond the usage line
    assert len(out.splitlines()) > 4


def _handlers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if sub.get_default("handler"):
                    yield sub.get_default("handler")
                yield from _handlers(sub)


def test_every_handler_resolves_to_a_callable_or_reports_not_built():
    handlers = set(_handlers(cli.build_parser()))
    assert len(handlers) == len(SUBCOMMANDS)
    for handler in handlers:
        func = cli._resolve(handler)
        assert func is None or callable(func), handler


def test_unbuilt_command_exits_2_with_plain_message(monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_parser", _parser_with_missing_handler)
    assert cli.main(["ghost"]) == 2
    assert "not built yet" in capsys.readouterr().err


def _parser_with_missing_handler():
    p = argparse.ArgumentParser(prog="mtlxray")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ghost").set_defaults(handler="mtlxray.no_such_module:cli_main")
    return p


def test_top_level_help_lists_all_commands():
    r = subprocess.run([sys.executable, "-m", "mtlxray.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ["synth", "shards", "model-summary", "train", "evaluate", "predict", "export", "submit", "demo", "bench"]:
        assert name in r.stdout
