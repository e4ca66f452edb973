"""One rank of a ZeRO-3 engine over the paper-width class head, every parameter partitioned, for
tests/model/test_heads.py (run under torchrun).

    torchrun --standalone --nproc_per_node 1 _zero3_class_head.py OUT_DIR

The head reads its conv's and norm's weights without calling them (`pooled_conv_bn_relu`); ZeRO-3
gathers a parameter around its own module's forward, and DeepSpeed's parameter getter registers
and gathers one read from another module's forward. Writes OUT_DIR/result.json: whether every
parameter was partitioned, and the head's output under the engine against the same head alone
(or the error its forward raised).
"""

import copy
import json
import sys
from pathlib import Path

import torch

from _deepspeed_exit import leave_after_deepspeed


class _Model(torch.nn.Module):
    """The head nested under a parent, as in the model (ZeRO-3 hooks every module)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.cls_head = head

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.cls_head(masks)


def main() -> None:
    import deepspeed

    from mtlxray.errors import error_line
    from mtlxray.model.heads import ClassHead
    from mtlxray.train.accelerator import keep_deepspeed_collectives_on_gloo

    keep_deepspeed_collectives_on_gloo()
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    head = ClassHead(64, 3)  # wide enough to fold (pooled_conv_bn_relu)
    head.set_mode("phase2")
    reference = copy.deepcopy(head)
    masks = torch.rand(2, 2, 16, 16, requires_grad=True)
    want = reference(masks)
    want.sum().backward()
    want_grad, masks.grad = masks.grad, None
    record: dict = {}
    trained = [p for p in head.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=_Model(head), optimizer=torch.optim.SGD(trained, lr=0.0),
                                      config={"train_micro_batch_size_per_gpu": 2,
                                              "zero_allow_untested_optimizer": True,
                                              "zero_optimization": {"stage": 3,
                                                                    "stage3_param_persistence_threshold": 0,
                                                                    "model_persistence_threshold": 0}})
    record["partitioned"] = [p.ds_tensor.numel() > 0 and p.data.numel() == 0 for p in head.parameters()]
    try:
        got = engine(masks)
        engine.backward(got.sum())
        record["max_abs_diff"] = float((got.detach() - want.detach()).abs().max())
        record["max_abs_grad_diff"] = float((masks.grad - want_grad).abs().max())
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        record["error"] = error_line(e)
    Path(sys.argv[1], "result.json").write_text(json.dumps(record))
    leave_after_deepspeed()


if __name__ == "__main__":
    main()
