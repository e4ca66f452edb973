"""README.md's commands: every command in its shell blocks parses (its subcommand and flags exist, its config
files exist and its KEY=VALUE overrides are valid config keys, its make targets and scripts exist), and the quick
start's blocks and the python snippets run, in README order, at a tiny scale.

The reference's long commands (training a paper model, a Slurm chain) are parsed, not run: their own tests run
them.
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
# the README's topic pages (docs/) hold the commands it links to: they are parsed the same way
DOCS = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))


def _commands() -> list[str]:
    """Each command line of the bash blocks of the README and docs/, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README + DOCS, re.S):
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


def test_no_example_but_the_demo_uses_the_demos_folders():
    """configs/demo.yaml reads runs/demo/shards and writes runs/demo/<phase>: an example on it names its own
    shards and run folder, and no other example reads or writes runs/demo (the demo's own, reused by the next
    `mtlxray demo`). The demo study (`make demo-study`, the demo over seeds) is the demo's own too."""
    for command in MTLXRAY:
        args = _mtlxray_args(_words(command))
        if args[:1] == ["demo"] or _placeholder(args) or "runs/demo_study" in args:
            continue
        assert "runs/demo/" not in command and not command.rstrip().endswith("runs/demo"), command
        if any(re.search(r"configs/demo(_phase2)?\.yaml", a) for a in args):
            assert any(a.startswith("data.shards=") for a in args), f"no data.shards= in `{command}`"
            assert any(a.startswith(("run.name=", "run.output_dir=")) for a in args), f"no own run in `{command}`"


# The quick start, run ------------------------------------------------------------------------------------------
# Every bash block under a "Quick start" heading and every python block runs, in README order, in one temporary
# folder: a tiny synthetic COVID-QU-Ex tree stands in for the Kaggle download, and the commands get a tiny model
# and schedule appended (TINY below). The commands this test cannot run, and why:
NOT_RUN = {
    r"^make demo\b": "minutes on 2 cores; `mtlxray demo --scale tiny` runs in tests/test_packaging.py",
    r"\bmtlxray demo\b": "the tiny demo runs in tests/test_packaging.py",
    r"--num_processes 8\b": "needs 8 GPUs (DDP over NCCL runs in tests/gpu)",
    r"slurm/pipeline\.sh|\bsbatch\b": "needs a Slurm cluster (the scripts run on one in tests/launch, marker slurm)",
    r"\bmtlxray submit\b(?!.*--dry-run)": "submits to a Slurm cluster (tests/launch, marker slurm)",
    r"runs/qu-ex-slurm/phase2/checkpoints": "reads what the Slurm jobs above trained",
}
TINY_IMAGE_SIZE = 64


def _tiny_overrides() -> tuple[str, ...]:
    from mtlxray.demo import TINY_SCALE_OVERRIDES

    return (*TINY_SCALE_OVERRIDES, "data.global_batch_size=null", "data.workers=0", "run.precision=fp32")


def _blocks() -> list[tuple[str, str, str]]:
    """(level-2 heading, language, text) of every fenced block, in README order."""
    heading, blocks = "", []
    for m in re.finditer(r"^(## [^\n]*)$|^```(\w*)\n(.*?)^```", README, re.M | re.S):
        if m.group(1):
            heading = m.group(1)
        else:
            blocks.append((heading, m.group(2), m.group(3)))
    return blocks


RUN_IN_ORDER = [(h, lang, text) for h, lang, text in _blocks()
                if lang == "python" or (lang == "bash" and h.startswith("## Quick start"))]


def _block_commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _tiny(args: list[str]) -> list[str]:
    """The command at the test's scale: tiny images, model, schedule and bootstrap."""
    if args[:2] == ["shards", "build"]:
        return [*args, "--image-size", str(TINY_IMAGE_SIZE), "--workers", "1"]
    if args[0] == "evaluate":
        return [*args, "--bootstrap", "20"]
    if args[0] in ("train", "doctor", "submit") or args[:2] == ["config", "show"]:
        last = max((i for i, a in enumerate(args) if re.match(r"^[\w.]+=", a)), default=len(args) - 1)
        return [*args[:last + 1], *_tiny_overrides(), *args[last + 1:]]
    return args


def _tiny_python(text: str) -> str:
    """A python block at the test's scale: a chain's common overrides start with the tiny ones, so
    that its checks (image size against the shards) see the tiny model."""
    if "submit_pipeline(" not in text:
        return text
    assert "overrides=[" in text, "a submit_pipeline example gives common overrides"
    return text.replace("overrides=[", "overrides=[*_TINY_OVERRIDES, ", 1)


def test_the_quick_start_has_blocks_to_run_and_says_why_it_skips_the_others():
    commands = [c for _, lang, text in RUN_IN_ORDER if lang == "bash" for c in _block_commands(text)]
    run = [c for c in commands if not any(re.search(p, c) for p in NOT_RUN)]
    assert {_mtlxray_args(_words(c))[0] for c in run} >= {"shards", "train", "evaluate", "predict", "export"}
    assert all(_mtlxray_args(_words(c)) is not None for c in run), "only mtlxray commands run in-process"


def test_the_quick_start_runs_in_readme_order(tmp_path, monkeypatch, capsys):
    import contextlib
    import io
    import time

    from mtlxray.data.synth import synthesize
    from mtlxray.train.signals import StopFlag

    monkeypatch.chdir(tmp_path)
    # the stand-in for the unzipped Kaggle folder the quick start starts from
    synthesize(tmp_path / "data" / "COVID-QU-Ex", "tiny", seed=0, size=TINY_IMAGE_SIZE, workers=1, progress=False)
    timings = []
    for heading, lang, text in RUN_IN_ORDER:
        t0 = time.perf_counter()
        if lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(_tiny_python(text), f"README.md python block under {heading!r}", "exec"),
                     {"__name__": "readme", "_TINY_OVERRIDES": list(_tiny_overrides())})
            timings.append((f"python: {text.splitlines()[0]}", 0, time.perf_counter() - t0))
            continue
        for command in _block_commands(text):
            if any(re.search(p, command) for p in NOT_RUN):
                timings.append((command, "not run", 0.0))
                continue
            t0 = time.perf_counter()
            args = _tiny(_mtlxray_args(_words(command)))
            try:
                code = cli.main(args)
            finally:
                if StopFlag._installed is not None:  # train's signal handlers, installed per process
                    StopFlag._installed.close()
            timings.append((command, code, time.perf_counter() - t0))
            assert code == 0, f"`{command}` exited {code}:\n{capsys.readouterr().err[-3000:]}"
    with capsys.disabled():
        print("\nREADME quick start, in order (exit code, seconds):")
        for command, code, seconds in timings:
            print(f"  {code!s:>7} {seconds:6.1f}  {command[:110]}")
    assert (tmp_path / "runs/qu-ex/phase2/checkpoints/best/model.safetensors").is_file()
