"""`mtlxray config list|show`."""

from __future__ import annotations

import argparse
import sys

from mtlxray.cli.common import config_args


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list and inspect configs",
                       description="List the shipped configs, or inspect a configuration file.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("list", help="list the configs that ship with mtlxray, by name",
                        description="List the shipped configs (the repository's configs/, which a wheel carries) "
                                    "by the names `--config` takes, each with the first line of its comment, and "
                                    "the folder they are in. A path to a file always wins over a name.")
    q.set_defaults(handler=config_list)
    q = csub.add_parser("show", help="print the fully resolved config as YAML",
                        description="Resolve `extends:`, apply overrides, validate every key and type, "
                                    "and print the result as YAML.")
    config_args(q)
    q.set_defaults(handler=config_show)


def config_show(args: argparse.Namespace) -> int:
    from mtlxray.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def config_list(args: argparse.Namespace) -> int:
    """`mtlxray config list`: each shipped config's name and the first line of its comment."""
    from mtlxray.resources import configs_dir, shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs))
    print(f"{len(configs)} configs in {configs_dir()} (--config NAME, or a path):")
    for name, path in configs.items():
        first = path.read_text().split("\n", 1)[0]
        summary = first.lstrip("#").strip() if first.startswith("#") else f"({path.suffix[1:]} file)"
        print(f"  {name:<{width}}  {summary}")
    return 0
