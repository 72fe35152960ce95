"""The flat AdamW (engine/flat_adamw.py): its torch-ops path equals torch's AdamW; a bf16 model
stepped with it follows torch's AdamW on the same gradients step by step (DP=1, sharded DP=2,
clipped and unclipped steps, decayed and undecayed groups, layer-wise LR scales); both
checkpoint paths resume it exactly; the switch is validated."""
import pytest
import torch

from csrc import loader
from engine.config import ConfigError, validate
from tests.distributed import run_distributed
from tests.optimizer_harness import given_gradient_steps
from tests.test_checkpoint import losses
from tests.training_harness import tiny_config

BF16 = {"precision": "bf16", "weight_decay": 0.1, "clip_grad": 0.5}
SMALL_BUCKETS = {"bucket_mb": 0.05}  # several buckets; parameters cut between DP shards
STEPS = 5


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, None])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reference_step_equals_torch_adamw(model_dtype, weight_decay):
    """Five steps with a clip factor: master and moments bit for bit as torch.optim.AdamW's,
    the model output the master rounded to its dtype."""
    generator = torch.Generator().manual_seed(0)
    n = 1003
    master = torch.randn(n, generator=generator)
    param = torch.nn.Parameter(master.clone())
    reference = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=True)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    model = None if model_dtype is None else torch.empty(n, dtype=model_dtype)
    for step in range(1, 6):
        grad, scale = torch.randn(n, generator=generator), torch.tensor(0.25 * step)
        param.grad = grad * scale
        reference.step()
        loader.adamw_step(master, grad, exp_avg, exp_avg_sq, model, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                          weight_decay=weight_decay, step=step, grad_scale=scale)
        state = reference.state[param]
        assert torch.equal(master, param.data) and torch.equal(exp_avg, state["exp_avg"])
        assert torch.equal(exp_avg_sq, state["exp_avg_sq"])
        if model is not None:
            assert torch.equal(model, master.to(model_dtype))


def run(world: int, flat: bool, optim: dict, resume_mode: str | None = None) -> list:
    overrides = {"optim": {"flat_adamw": str(flat).lower(), **optim}, "train": BF16}
    return run_distributed(given_gradient_steps, world, overrides, STEPS, resume_mode)


def assert_same_snapshots(got: list, expected: list, atol=1e-6) -> None:
    """Masters and moments within atol (gathered over DP), the 16-bit weights equal."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        for name, entry in b["state"].items():
            if name.startswith("__"):
                assert a["state"][name] == entry, name
                continue
            assert set(a["state"][name]) == {"exp_avg", "exp_avg_sq", "master"}, name
            for key, value in entry.items():
                torch.testing.assert_close(a["state"][name][key], value, rtol=0, atol=atol,
                                           msg=lambda m: f"step {step + 1} {name} {key}: {m}")
        for name, weight in b["weights"].items():
            assert torch.equal(a["weights"][name], weight), f"step {step + 1} weight {name}"


LAYOUTS = {
    "dp1": (1, {}),
    "dp2_sharded": (2, {"shard": True, **SMALL_BUCKETS}),
    "dp2_sharded_layer_lr_decay": (2, {"shard": True, "layer_lr_decay": 0.8, **SMALL_BUCKETS}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_step_matches_torch_adamw(layout):
    world, optim = LAYOUTS[layout]
    flat = run(world, True, optim)
    torch_adamw = run(world, False, optim)
    assert all(r["flat"] for r in flat) and not any(r["flat"] for r in torch_adamw)
    clipped = flat[0]["clipped"]
    assert any(clipped) and not all(clipped), clipped  # both kinds of step
    assert clipped == torch_adamw[0]["clipped"]
    for got, expected in zip(flat, torch_adamw):
        assert_same_snapshots(got["snapshots"], expected["snapshots"])
    # The model weights are the masters rounded: the flat pass wrote them, no copy did.
    for name, entry in flat[0]["snapshots"][-1]["state"].items():
        if not name.startswith("__"):
            assert torch.equal(flat[0]["snapshots"][-1]["weights"][name], entry["master"].bfloat16().float()), name


@pytest.mark.parametrize("mode", ["by_name", "state_dict"])
@pytest.mark.parametrize("world, optim", [(1, {}), (2, {"shard": True, **SMALL_BUCKETS})])
def test_state_round_trip_resumes_identically(mode, world, optim):
    """State saved after 3 steps, 2 more steps, the state put back: the 2 steps again give the
    same masters, moments and weights (the flat moments took the loaded state back)."""
    for result in run(world, True, optim, resume_mode=mode):
        assert result["flat"] and len(result["again"]) == 2
        assert_same_snapshots(result["again"], result["snapshots"][3:], atol=0)


def test_checkpoint_resume_is_bit_exact(tmp_path):
    """Through engine/checkpoint.py at sharded DP=2: 4 steps in one go equal 2, a save, a fresh
    start from the checkpoint and 2 more."""
    base = {"train": {**BF16, "iters": 4}, "optim": {"shard": True, "flat_adamw": "true", **SMALL_BUCKETS}}
    straight = losses({**base, "checkpoint": {"save": str(tmp_path), "interval": 2}}, 2)
    resumed = losses({**base, "checkpoint": {"load": str(tmp_path), "load_step": 2}}, 2)
    assert len(straight) == 4 and resumed == straight[2:]


def config_error(optim: dict, train=None) -> str:
    with pytest.raises(ConfigError) as error:
        validate(tiny_config({"optim": optim, "train": train or {}}), 1)
    return str(error.value)


def test_switch_is_validated():
    assert "optim.flat_adamw" in config_error({"flat_adamw": "maybe"})
    message = config_error({"flat_adamw": "true", "name": "lion"})
    assert "optim.flat_adamw" in message and "adamw" in message
    cfg = validate(tiny_config({"optim": {"flat_adamw": True}}), 1)  # a YAML boolean
    assert cfg.optim.flat_adamw == "true"
    assert validate(tiny_config({"optim": {"flat_adamw": "auto", "name": "lion"}}), 1).optim.flat_adamw == "auto"


def test_switch_resolution():
    from engine.flat_adamw import use_flat_adamw
    from parallel.distributed_optimizer import Piece

    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with_master = Piece("w", weight, 0, 4, main=torch.zeros(4))
    fp32 = torch.nn.Parameter(torch.zeros(4))
    own_master = Piece("w", fp32, 0, 4, main=fp32.data)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_flat_adamw("true", "adamw", cpu, [with_master])
    assert not use_flat_adamw("auto", "adamw", cpu, [with_master])
    assert use_flat_adamw("auto", "adamw", cuda, [with_master])
    assert not use_flat_adamw("false", "adamw", cuda, [with_master])
    assert not use_flat_adamw("auto", "lion", cuda, [with_master])
    assert not use_flat_adamw("true", "adamw", cpu, [with_master, own_master])  # fp32 weights: torch's AdamW
