"""FP8 weight copies are made once per optimizer step and never outlive a weight change."""
import torch

import parallel.fp8 as fp8
from tests.distributed import run_distributed


def _copies_of(weight):
    entry = fp8._weight_copies.get(weight)
    return None if entry is None else entry[1]


def test_copies_are_reused_until_the_weight_changes():
    fp8.clear_weight_cache()
    linear = fp8.fp8_linear_fn()
    x, w = torch.randn(32, 64), (torch.randn(48, 64) * 0.1).requires_grad_()
    linear(x, w)
    first = _copies_of(w)
    linear(x, w)
    assert _copies_of(w) is first  # the second micro-batch reuses them
    with torch.no_grad():
        w.mul_(2)  # an in-place write bumps the version: quantised again
    y = linear(x, w)
    assert _copies_of(w) is not first
    torch.testing.assert_close(y, fp8.fp8_linear_fn()(x, w.detach().clone()))
    second = _copies_of(w)
    w.data.mul_(2)  # a write the version counter does not see (as a parameter gather's)
    fp8.clear_weight_cache()  # ... is what the optimizer's clear is for
    linear(x, w)
    assert _copies_of(w) is not second and _copies_of(w)[0].float().abs().max() > 0


def test_frozen_weights_are_not_cached():
    """A frozen model (DPO's reference) runs once per micro-batch: its copies would only hold memory."""
    fp8.clear_weight_cache()
    frozen = torch.randn(48, 64) * 0.1
    fp8.fp8_linear_fn()(torch.randn(32, 64), frozen)
    assert _copies_of(frozen) is None


def train_fp8(cache: bool):
    fp8.CACHE_WEIGHTS = cache
    from tests.optimizer_harness import train_steps

    return train_steps({"train": {"precision": "fp8", "iters": 3},
                        "optim": {"shard": True, "overlap_param_gather": True}})


def test_training_with_cached_copies_equals_quantising_every_call():
    """DP=2 with the sharded optimizer's parameter gather overlapped with the next forward:
    the copies must be remade from the gathered weights each step."""
    cached = run_distributed(train_fp8, 2, True)
    fresh = run_distributed(train_fp8, 2, False)
    assert cached[0]["loss"] == fresh[0]["loss"] and cached[0]["grad_norm"] == fresh[0]["grad_norm"]
    for name, weight in cached[0]["weights"].items():
        assert torch.equal(weight, fresh[0]["weights"][name]), name
