"""The arithmetic of PPO and GRPO on per-token tensors [b, n] of response tokens.

`mask` is 1.0 on generated tokens (up to and including EOS) and 0.0 after; every sum below is
over masked tokens only. Loss functions return the SUM over tokens (the caller divides by the
global token count of the minibatch, as the LM loss does) and statistics as sums too.
"""
from __future__ import annotations

import torch

from parallel import comm


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) per row, the episode ending at
    the last masked token: A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t.
    Returns (advantages, returns = advantages + values), zero where masked."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, dp_group=None, eps: float = 1e-8) -> torch.Tensor:
    """x shifted and scaled to zero mean and unit variance over the masked tokens of every
    data-parallel rank (one global statistic, whatever the layout)."""
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if dp_group is not None:
        comm.all_reduce(sums, dp_group)
    mean = sums[0] / sums[2].clamp(min=1)
    var = (sums[1] / sums[2].clamp(min=1) - mean * mean).clamp(min=0)
    return ((x - mean) * torch.rsqrt(var + eps)).to(x.dtype) * mask


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio: float):
    """PPO's clipped surrogate, summed: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with
    rho = exp(logp - logp_old). Returns (loss sum, number of tokens where the clip is active)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_active = (clipped < unclipped).float()
    return (loss * mask).sum(), (clip_active * mask).sum().detach()


def clipped_value_loss(values, old_values, returns, mask, value_clip: float):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), summed (c = 0: unclipped)."""
    loss = (values - returns) ** 2
    if value_clip > 0:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum()


def kl_k3(logprobs, ref_logprobs):
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's
    k3: exp(r) - r - 1 with r = logp_ref - logp), non-negative and unbiased; GRPO's KL term."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (score - mean of its group) / (std of its group + eps), groups being consecutive
    rows of `group_size` samples of one prompt."""
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


class KLController:
    """The KL penalty's coefficient: fixed, or adaptive (Ziegler et al. 2019): after each rollout
    of n sequences with mean KL k, beta *= 1 + clip(k / target - 1, -0.2, 0.2) x n / horizon."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, sequences: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * sequences / self.horizon
        return self.value
