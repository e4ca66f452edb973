"""`mtlxray model-summary`."""

from __future__ import annotations

import argparse

from mtlxray.cli.common import config_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-summary", help="parameter counts per part and GFLOPs per image",
        description="Print the parameter count of each part beside the paper's figure, and the GFLOPs "
                    "per image (forward and forward+backward) counted with torch.utils.flop_counter.")
    config_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--lr-groups", action="store_true",
                   help="list the optimizer's parameter groups of the config's phase instead: their modules, "
                        "parameter count, learning rate and weight decay")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Parameters and FLOPs per part, or (--lr-groups) the optimizer's groups."""
    from mtlxray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not args.lr_groups:
        from mtlxray.model.summary import summarise_model

        print(summarise_model(cfg, as_json=args.json))
        return 0
    import json

    from mtlxray.model import build_model
    from mtlxray.train.optim import describe_param_groups, param_groups
    from mtlxray.train.phases import prepare_phase

    model = build_model(cfg.model, pretrained=False)
    prepare_phase(model, cfg.phase)
    groups = describe_param_groups(model, param_groups(model, cfg))
    if args.json:
        print(json.dumps({"config": args.config, "phase": cfg.phase.name, "groups": groups}, indent=2))
        return 0
    print(f"{cfg.model.name}, {cfg.phase.name}: optimizer parameter groups (optim.lr={cfg.optim.lr:g})")
    width = max(len(g["name"]) for g in groups)
    for g in groups:
        print(f"  {g['name']:<{width}}  {g['params']:>12,} params  lr {g['lr']:<10.3g} weight decay "
              f"{g['weight_decay']:<8g} {', '.join(g['modules'])}")
    return 0
