"""Every command in README.md's shell blocks parses: its subcommand and flags exist, its config files
exist and its KEY=VALUE overrides are valid config keys, its make targets and scripts exist.

The commands are parsed, not run: the long ones (training a paper model, a Slurm chain) are run by
their own tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mtlxray import cli
from mtlxray.config import load_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    """Each command line of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = _commands()


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value environment settings
        words = words[1:]
    return words


def _mtlxray_args(words: list[str]) -> list[str] | None:
    """The arguments given to mtlxray, however it is launched (plain, .venv/bin, launchers, -m)."""
    for i, w in enumerate(words):
        if w.endswith("mtlxray") and "/" not in w.replace(".venv/bin/", ""):
            return words[i + 1:]
        if w == "mtlxray.cli" and i and words[i - 1] == "-m":
            return words[i + 1:]
    return None


def _placeholder(args: list[str]) -> bool:
    """A synopsis line (`...`, `[--opt]`), not a command to parse."""
    return any("..." in a or a.startswith("[") for a in args)


MTLXRAY = [c for c in COMMANDS if _mtlxray_args(_words(c)) is not None]


def test_the_readme_has_commands_to_check():
    assert len(MTLXRAY) > 30 and any(c.startswith("make demo") for c in COMMANDS)


def _subparser(words: list[str]):
    """The parser of the (possibly nested) subcommand that `words` start with, and its words."""
    import argparse

    parser, used = cli.build_parser(), []
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser, used = subs[0].choices[word], [*used, word]
    return parser, used


@pytest.mark.parametrize("command", MTLXRAY)
def test_mtlxray_command_parses_with_existing_flags_configs_and_keys(command):
    args = _mtlxray_args(_words(command))
    if _placeholder(args):  # a synopsis: the subcommand and every flag it names must exist
        parser, used = _subparser(args)
        assert used, f"no mtlxray subcommand in `{command}`"
        known = {o for a in parser._actions for o in a.option_strings}
        flags = {f.strip("[]").split("=")[0] for f in args if f.strip("[").startswith("--")}
        assert flags <= known, f"unknown flags {sorted(flags - known)} in `{command}`"
        return
    try:
        ns = cli.build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"`mtlxray {' '.join(args)}` does not parse (exit {e.code})")
    config = getattr(ns, "config", None) or getattr(ns, "model_config", None)
    configs = [config, *getattr(ns, "then", [])]
    for path in filter(None, configs):
        if path.startswith("configs/"):
            assert (REPO / path).is_file(), path
    overrides = getattr(ns, "overrides", None)
    if config and config.startswith("configs/") and overrides:
        load_config(REPO / config, overrides)  # unknown keys or bad values raise ConfigError


@pytest.mark.parametrize("command", [c for c in COMMANDS if _words(c)[:1] == ["make"]])
def test_make_targets_exist(command):
    makefile = (REPO / "Makefile").read_text()
    for target in _words(command)[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target


@pytest.mark.parametrize("command", [c for c in COMMANDS if "slurm/" in c])
def test_slurm_scripts_exist_and_are_executable(command):
    for word in _words(command):
        if word.startswith("slurm/"):
            assert (REPO / word).is_file() and (REPO / word).stat().st_mode & 0o111, word
