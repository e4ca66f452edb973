"""mtlxray.memory_plan: the activation counts agree with real tensors and move with the batch and the
checkpointing mode; the projection of model state and totals responds to GPUs, batch and backend."""

import pytest

from mtlxray import memory_plan as plan
from mtlxray.bench import memory as mem


@pytest.fixture(scope="module")
def tiny_fp32():
    return mem.paper_config("phase2", True)


def test_fake_tensors_count_the_bytes_real_tensors_hold(tiny_fp32):
    # selective checkpointing: autograd's saved tensors, checkpoint inputs and SAC's kept outputs all count
    real = plan.measure_activations(tiny_fp32, precision="fp32", fake=False, modes=("selective",))
    fake = plan.measure_activations(tiny_fp32, precision="fp32", fake=True, modes=("selective",))
    for r, f in zip(real, fake):
        assert (r.retained, r.backward_peak, r.saved_by_hooks) == (f.retained, f.backward_peak, f.saved_by_hooks)


def test_activation_counts_grow_with_the_batch_and_shrink_with_checkpointing(tiny_fp32):
    none, block = plan.measure_activations(tiny_fp32, precision="bf16", batches=(2, 4), modes=("none", "block"))
    for a in (none, block):
        assert a.retained[1] > a.retained[0] and a.per_image() > 0
        assert a.backward_peak[0] >= a.retained[0]  # backward starts from what forward kept
        assert a.at(16) > a.at(8)
    assert block.per_image() < none.per_image() / 2
    # Without checkpointing, the saved-tensor hooks see nearly all that is kept (the outputs aside);
    # inside checkpointed segments torch's own hooks take over, and they see less than is kept.
    assert none.saved_by_hooks[1] <= none.retained[1] and none.saved_by_hooks[1] > 0.95 * none.retained[1]
    assert block.saved_by_hooks[1] <= block.retained[1]


def test_projection_moves_with_gpus_batch_and_backend():
    act = plan.ActivationBytes(phase="phase1", grad_checkpoint="none", precision="bf16", img_size=256,
                              batches=(2, 4), retained=(300 * 2**20, 500 * 2**20),
                              backward_peak=(320 * 2**20, 540 * 2**20), saved_by_hooks=(0, 0),
                              attention_matrices=(0, 0), fake=True)
    params, trainable = 44_000_000, 30_000_000
    # sharded state shrinks with more GPUs; DDP's does not
    for backend, shrinks in (("ddp", False), ("zero1", True), ("zero2", True), ("zero3", True)):
        one, eight = (plan.state_bytes(backend, n, params, trainable)["total"] for n in (1, 8))
        assert (eight < one) == shrinks, backend
    assert plan.state_bytes("zero3", 8, params, trainable)["weights"] < plan.state_bytes("zero2", 8, params, trainable)["weights"]
    assert plan.state_bytes("zero1", 8, params, trainable, bucket_elements=10**6)["total"] < \
        plan.state_bytes("zero1", 8, params, trainable)["total"]
    # activations grow linearly with the batch
    p8, p16, p32 = (plan.project(act, b, "ddp", 8, params, trainable)["total"] for b in (8, 16, 32))
    assert p16 - p8 == pytest.approx((p32 - p16) / 2)
    # the largest batch that fits does fit, and one more does not
    for cap in plan.CARDS.values():
        b = plan.max_batch(act, cap, "ddp", 8, params, trainable)
        assert plan.project(act, b, "ddp", 8, params, trainable)["total"] <= cap
        assert plan.project(act, b + 1, "ddp", 8, params, trainable)["total"] > cap
    assert plan.max_batch(act, plan.CARDS["141GB"], "ddp", 8, params, trainable) > \
        plan.max_batch(act, plan.CARDS["80GB"], "ddp", 8, params, trainable)
