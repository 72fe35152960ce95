"""PPO / GRPO arithmetic against direct per-element formulas: GAE, whitening, the clipped
policy and value losses, the k3 KL, group advantages, the KL controllers and the rule reward."""
import math

import pytest
import torch

from engine.rl.losses import (KLController, clipped_policy_loss, clipped_value_loss, gae, group_advantages, kl_k3,
                              masked_whiten)
from engine.rl.tasks import rule_reward
from tests.distributed import run_distributed


def gae_direct(rewards, values, length, gamma, lam):
    """Textbook GAE for one episode of `length` steps, terminal value 0, one step at a time."""
    advantages = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_value = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        advantages[t] = total
    return advantages


def test_gae_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        expected = gae_direct(rewards[row].tolist(), values[row].tolist(), n, 0.9, 0.8)
        torch.testing.assert_close(advantages[row, :n], torch.tensor(expected), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returns[row, :n], advantages[row, :n] + values[row, :n])
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.ones(1, 3))  # the Monte-Carlo return
    torch.testing.assert_close(advantages, 1 - values)


def test_whitening_uses_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0])
    expected = (valid - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(out[mask.bool()], expected, rtol=1e-5, atol=1e-6)
    assert out[~mask.bool()].abs().sum() == 0


def test_clipped_policy_loss_elementwise():
    logp = torch.tensor([[0.0, 0.5, -0.5, 0.1]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = clipped_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    expected = 0.0
    for lp, a in [(0.0, 1.0), (0.5, 1.0), (-0.5, -1.0)]:
        ratio = math.exp(lp)
        expected += -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert clipped.item() == 2  # ratio e^0.5 > 1.2 with A > 0, and e^-0.5 < 0.8 with A < 0


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-math.exp(0.05))


def test_clipped_value_loss():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    mask = torch.ones(1, 2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 0.25 both ways
    assert clipped_value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * (3.24 + 0.25))
    assert clipped_value_loss(values, old, returns, mask, 0.0).item() == pytest.approx(0.5 * (1 + 0.25))


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    logp, ref = torch.tensor([0.0, -1.0, -2.0]), torch.tensor([0.0, -2.0, -1.0])
    kl = kl_k3(logp, ref)
    assert kl[0] == 0 and (kl >= 0).all()
    assert kl[1].item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_group_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    adv = group_advantages(scores, 3)
    first = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(adv[:3], (first - first.mean()) / (first.std() + 1e-4))
    torch.testing.assert_close(adv[3:], torch.zeros(3))  # equal scores teach nothing


def test_kl_controllers():
    fixed = KLController(0.1)
    assert fixed.update(5.0, 100) == 0.1
    adaptive = KLController(0.1, target=1.0, horizon=100)
    assert adaptive.update(3.0, 50) == pytest.approx(0.1 * (1 + 0.2 * 0.5))  # error clipped at +0.2
    assert adaptive.update(0.9, 100) == pytest.approx(0.11 * (1 - 0.1))


def test_rule_reward():
    assert rule_reward("19", "19") == 1.0 and rule_reward(" 19 ", "19") == 1.0
    assert rule_reward("18", "19") == pytest.approx(0.25)
    assert rule_reward("", "19") == 0.0 and rule_reward("191", "19") == pytest.approx(0.5 * 2 / 3)


def test_response_logprobs_chunked_equals_full_logits():
    """The chunked output layer (model.fused_cross_entropy) gives the log-probabilities and
    gradients of the full-logits path, with a temperature and a vocabulary cut to a tokenizer's."""
    run_distributed(chunked_against_full_logprobs, 1)


def chunked_against_full_logprobs():
    from engine.inference import build_chunks
    from engine.rl.scoring import response_logprobs
    from models.config import ModelConfig, resolve_preset
    from parallel.grid import build_grid, init_distributed
    from parallel.random import RNGTracker

    device = init_distributed("cpu", 120)
    grid = build_grid(1, 1, device=device)
    cfg = resolve_preset(ModelConfig(preset="tiny"))
    rng = RNGTracker(device)
    rng.seed(0, 0, 0)
    model = build_chunks(cfg, grid, rng, device, torch.float32, seed=3)[0]
    tokens = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        model.cfg.fused_cross_entropy = fused
        model.zero_grad()
        normed = model(tokens, return_hidden=True)
        logprobs = response_logprobs(model, normed, tokens, prompt_width=7, temperature=0.7, vocab_limit=200)
        (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
        grads = [p.main_grad.clone() if hasattr(p, "main_grad") else p.grad.clone()
                 for p in model.parameters() if p.requires_grad]
        results.append((logprobs.detach(), grads))
    (chunked, chunked_grads), (full, full_grads) = results
    assert chunked.shape == (3, 5) and (chunked < 0).all()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
