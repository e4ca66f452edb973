"""One rank of a two-rank ZeRO-3 partition, for tests/test_checkpoint.py (run under torchrun).

    torchrun --standalone --nproc_per_node 2 _zero3_padding.py OUT_DIR

A 3-element weight is cut into partitions of 2, so rank 1 holds one element and one element of
padding. Each rank writes OUT_DIR/rank<R>.json with what `all_finite` says when its padding holds a
NaN, and when a real element does.
"""

import json
import sys
from pathlib import Path

import torch

from _deepspeed_exit import leave_after_deepspeed


def main() -> None:
    import deepspeed

    from mtlxray.checkpoint import all_finite

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        model = torch.nn.Linear(3, 1)
    shard = model.weight.ds_tensor
    record = {"world_size": torch.distributed.get_world_size(), "shard": shard.numel(),
              "ds_numel": model.weight.ds_numel}
    with torch.no_grad():
        if rank == 1:
            shard[1] = float("nan")  # the padding
        record["finite_with_nan_padding"] = bool(all_finite(model))
        shard[0] = float("nan")  # a real weight
        record["finite_with_nan_weight"] = bool(all_finite(model))
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(record))
    leave_after_deepspeed()


if __name__ == "__main__":
    main()
