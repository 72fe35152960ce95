"""Preference losses on sequence log-probabilities: DPO (sigmoid, with label smoothing as
conservative DPO), IPO and hinge (SLiC) against a reference model, and SimPO and ORPO without
one.

The first three read the same quantity, the policy's log-ratio of chosen over rejected minus
the reference's:

    d = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))

    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)    Rafailov et al. 2023;
             eps > 0 is conservative DPO (Mitchell 2023): labels flipped with probability eps
    ipo      (d - 1 / (2 beta))^2                                         Azar et al. 2023
    hinge    max(0, 1 - beta d)                                            SLiC, Zhao et al. 2023

The reference-free two read the mean token log-probability of each response,
a = log pi(y|x) / |y|:

    simpo    -(1 - eps) log sigmoid(m) - eps log sigmoid(-m),
             m = beta (a_w - a_l) - gamma                                  Meng et al. 2024
    orpo     -a_w - beta log sigmoid(log odds(y_w) - log odds(y_l)),
             log odds(y) = a - log(1 - exp(a))                             Hong et al. 2024

(ORPO's first term is the chosen response's mean token NLL, per pair; its beta is the paper's
lambda.) Log-probabilities are sums over the response tokens (IPO as in its paper; TRL's "ipo"
averages them over the response length instead). The implicit rewards logged alongside are
beta (log pi - log ref) of each response, and beta a without a reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import DPO_LOSSES, REFERENCE_FREE_DPO_LOSSES

REFERENCE_LOSS_TYPES = tuple(loss for loss in DPO_LOSSES if loss not in REFERENCE_FREE_DPO_LOSSES)


def sequence_logps(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's trained tokens: token_loss is the per-token
    cross-entropy [b, s] (fp32), loss_mask 1 on response tokens."""
    return -(token_loss.float() * loss_mask).sum(dim=-1)


def preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses [n] and the implicit rewards of chosen and rejected [n] (detached)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = smoothed_logistic_loss(beta * d, label_smoothing)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; use one of {', '.join(REFERENCE_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def smoothed_logistic_loss(margin, label_smoothing: float):
    """-log sigmoid(margin), with labels flipped with probability label_smoothing."""
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def reference_free_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float,
                        loss_type: str, gamma: float = 0.0, label_smoothing: float = 0.0):
    """SimPO or ORPO per-pair losses [n] from summed response log-probs and response token
    counts, and the rewards beta x mean token log-prob of chosen and rejected [n] (detached)."""
    chosen_mean = policy_chosen / chosen_tokens.clamp(min=1)
    rejected_mean = policy_rejected / rejected_tokens.clamp(min=1)
    if loss_type == "simpo":
        losses = smoothed_logistic_loss(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    elif loss_type == "orpo":
        # log(1 - exp(a)) as log(-expm1(a)): exact where a is near 0 (a response almost certain)
        log_odds = (chosen_mean - rejected_mean) - (torch.log(-torch.expm1(chosen_mean))
                                                    - torch.log(-torch.expm1(rejected_mean)))
        losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown reference-free loss {loss_type!r}; use one of {', '.join(REFERENCE_FREE_DPO_LOSSES)}")
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def reward_sums(chosen_rewards, rejected_rewards) -> torch.Tensor:
    """[sum of chosen rewards, sum of rejected rewards, pairs ranked right]: summed over micro-batches
    and data-parallel ranks, then divided by the pair count, they give the logged means."""
    correct = (chosen_rewards > rejected_rewards).float().sum()
    return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(), correct]).float()


def reward_metrics(sums: torch.Tensor, pairs: int, prefix: str = "") -> dict:
    chosen, rejected, correct = (value / pairs for value in sums.tolist())
    return {f"{prefix}rewards/chosen": chosen, f"{prefix}rewards/rejected": rejected,
            f"{prefix}margin": chosen - rejected, f"{prefix}accuracy": correct}
