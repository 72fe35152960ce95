"""GaLore (optim.name galore_adamw): exact properties of the projection and the update, the
optimizer-state byte count against a hand count, plain AdamW for unprojected parameters, and
training runs (falling loss, DP=2 equal to one process, a bit-exact resume at TP=2)."""
import functools

import pytest
import torch

from engine.galore import GaLoreAdamW, orthogonal_basis, project, project_back
from tests.distributed import run_distributed

SHAPES = [(24, 10), (10, 24)]  # both orientations: the basis spans columns, or rows
GALORE = {"name": "galore_adamw", "galore_rank": 8, "galore_update_interval": 4, "galore_scale": 1.0}


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_keeps_the_top_singular_directions(shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    full = orthogonal_basis(grad, min(shape))  # rank = the smaller dimension: nothing is lost
    torch.testing.assert_close(project_back(project(grad, full), full, shape), grad, rtol=1e-5, atol=1e-5)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    low = orthogonal_basis(grad, 3)  # rank 3: the best rank-3 approximation (Eckart-Young)
    torch.testing.assert_close(project_back(project(grad, low), low, shape), u[:, :3] @ torch.diag(s[:3]) @ vh[:3],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_updates_stay_in_one_rank_r_subspace_until_the_refresh(shape):
    generator = torch.Generator().manual_seed(1)
    param = torch.randn(shape, generator=generator)
    optimizer = GaLoreAdamW([{"params": [param], "galore_rank": 3}], lr=0.1, update_interval=4, scale=0.5)
    start = param.clone()
    for _ in range(4):
        param.grad = torch.randn(shape, generator=generator)
        optimizer.step()
    change, basis = param - start, optimizer.state[param]["basis"]
    singular = torch.linalg.svdvals(change)
    assert singular[3:].max() < 1e-5 * singular[0], "four updates between refreshes span at most rank 3"
    torch.testing.assert_close(project_back(project(change, basis), basis, shape), change, rtol=1e-5, atol=1e-6)
    param.grad = torch.randn(shape, generator=generator)
    optimizer.step()  # step 5: a new basis from this gradient
    assert not torch.allclose(optimizer.state[param]["basis"], basis)
    assert optimizer.state[param]["exp_avg"].shape == ((shape[0], 3) if shape[0] >= shape[1] else (3, shape[1]))


def test_unprojected_parameters_are_torch_adamw():
    generator = torch.Generator().manual_seed(2)
    ours = [torch.randn(6, 5, generator=generator), torch.randn(5, generator=generator)]
    theirs = [p.clone() for p in ours]
    kwargs = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    galore = GaLoreAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:]}], **kwargs)
    adamw = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}],
                              foreach=False, **kwargs)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        galore.step()
        adamw.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def reference_galore(weight, grads, rank, lr, betas, eps, weight_decay, interval, scale):
    """The paper's Algorithm 1 for a tall matrix (m >= n), with torch-AdamW arithmetic."""
    weight, m, v = weight.clone(), 0, 0
    for step, grad in enumerate(grads, start=1):
        if (step - 1) % interval == 0:
            basis = torch.linalg.svd(grad, full_matrices=False)[2][:rank]
        low = grad @ basis.t()
        m = betas[0] * m + (1 - betas[0]) * low
        v = betas[1] * v + (1 - betas[1]) * low * low
        direction = (m / (1 - betas[0] ** step)) / ((v / (1 - betas[1] ** step)).sqrt() + eps)
        weight = weight * (1 - lr * weight_decay) - lr * scale * direction @ basis
    return weight


def test_projected_parameter_follows_the_published_algorithm():
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(20, 8, generator=generator)
    grads = [torch.randn(20, 8, generator=generator) for _ in range(7)]  # refreshes at steps 1 and 4 and 7
    hyper = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected = reference_galore(param, grads, rank=4, interval=3, scale=0.25, **hyper)
    optimizer = GaLoreAdamW([{"params": [param], "galore_rank": 4}], update_interval=3, scale=0.25, **hyper)
    for grad in grads:
        param.grad = grad
        optimizer.step()
    torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


def galore_train(overrides: dict) -> dict:
    import os

    from engine.config import validate
    from engine.training import Trainer, shutdown
    from tests.training_harness import tiny_config

    torch.use_deterministic_algorithms(True)
    trainer = Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))
    history = trainer.train()
    result = {"loss": [r["loss"] for r in history], "state_bytes": trainer.optimizer.state_bytes(),
              "projected": len(trainer.optimizer.inner.projected_params())}
    shutdown()
    return result


@functools.lru_cache(maxsize=None)
def serial_galore():
    return run_distributed(galore_train, 1, {"optim": GALORE})[0]


def test_state_bytes_match_a_hand_count():
    # tiny preset, fp32 (no master copies), rank 8, every 2-D weight under layers.* projected.
    # A projected [m, n] keeps 2 moments of r x max(m, n) values and a basis of r x min(m, n):
    #   qkv  [128, 64]: 4*2*8*128 + 4*8*64 =  8192 + 2048 = 10240 bytes
    #   proj [64, 64]:  4*2*8*64  + 4*8*64 =  4096 + 2048 =  6144
    #   fc1  [352, 64]: 4*2*8*352 + 4*8*64 = 22528 + 2048 = 24576
    #   fc2  [64, 176]: 4*2*8*176 + 4*64*8 = 11264 + 2048 = 13312   -> 54272 per layer, 4 layers
    # Plain AdamW state (2 moments, 8 bytes per value) for the rest: embedding and output layer
    # 512 x 64 each, 9 norms of 64 -> 66112 values.
    projected = 4 * (10240 + 6144 + 24576 + 13312)
    plain = 8 * (2 * 512 * 64 + 9 * 64)
    result = serial_galore()
    assert result["projected"] == 16
    assert result["state_bytes"] == projected + plain == 745984
    adamw_bytes = 8 * (4 * (128 * 64 + 64 * 64 + 352 * 64 + 64 * 176) + 2 * 512 * 64 + 9 * 64)
    assert adamw_bytes == 2003456  # GaLore keeps 37% of it here (the embeddings dominate a tiny model)


def test_galore_reduces_the_loss_and_dp2_equals_one_process():
    serial = serial_galore()
    assert serial["loss"][-1] < serial["loss"][0] - 0.1, serial["loss"]
    for result in run_distributed(galore_train, 2, {"optim": GALORE}):
        torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(serial["loss"]), rtol=1e-5, atol=1e-6)


def test_tp2_galore_resumes_bit_exact(tmp_path):
    """Per-shard projections at TP=2, saved per TP place: the resumed run repeats the losses
    of the uninterrupted one (a refresh at update 4 falls after the resume)."""
    from tests.training_harness import train_and_collect

    base = {"optim": GALORE, "parallel": {"tp": 2}, "train": {"iters": 6}}
    straight = run_distributed(train_and_collect, 2, {**base, "checkpoint": {"save": str(tmp_path), "interval": 3}},
                               False)[0]
    resumed = run_distributed(train_and_collect, 2, {**base, "checkpoint": {"load": str(tmp_path), "load_step": 3}},
                              False)[0]
    assert straight["loss"][-1] < straight["loss"][0]
    assert resumed["loss"] == straight["loss"][3:]
    # At TP=1 the weights load (the first loss is the same), the per-shard projections restart.
    serial = run_distributed(train_and_collect, 1, {**base, "parallel": {"tp": 1},
                                                    "checkpoint": {"load": str(tmp_path), "load_step": 3}}, False)[0]
    assert serial["loss"][0] == pytest.approx(straight["loss"][3], rel=1e-5) and len(serial["loss"]) == 3


def test_galore_config_errors():
    from engine.config import ConfigError, validate
    from tests.training_harness import tiny_config

    with pytest.raises(ConfigError, match="optim.shard"):
        validate(tiny_config({"optim": {**GALORE, "shard": True}}), 2)
    with pytest.raises(ConfigError, match="galore_adamw is for full fine-tuning"):
        validate(tiny_config({"optim": GALORE, "finetune": {"method": "lora"}}), 1)
    with pytest.raises(ConfigError, match="optim.galore_rank"):
        validate(tiny_config({"optim": {**GALORE, "galore_rank": 0}}), 1)
