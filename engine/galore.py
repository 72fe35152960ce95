"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection"): AdamW whose state for large 2-D weights lives in a low-rank projection of the
gradient, for full fine-tuning with less optimizer memory.

For a projected weight W [m, n] (with tensor parallelism: this rank's shard of it):

- every `update_interval` steps (and on the first), the basis is refreshed from the SVD of the
  current gradient G = U S V^T: the top `rank` right singular vectors P = V^T[:r] [r, n] when
  m >= n, else the top left ones Q = U[:, :r] [m, r], so the smaller side is projected;
- the gradient is projected, R = G P^T [m, r] (or Q^T G [r, n]), and Adam's two moments are
  kept at R's shape; the moments carry over a refresh unchanged, as in the paper's code;
- the Adam direction N = m_hat / (sqrt(v_hat) + eps) is projected back (N P, or Q N) and
  applied with the factor `scale` (the paper's alpha): W -= lr * scale * back(N).

Every other parameter (embeddings, norms, the output layer, and 2-D weights not targeted) is
plain AdamW. The Adam arithmetic is torch.optim.AdamW's (bias corrections, eps after the
bias-corrected root, decoupled weight decay W *= 1 - lr * wd before the update), so
unprojected parameters match it; the paper's code uses Hugging Face's older AdamW order
(decay after the update, eps before the correction), a difference of order eps and lr^2 wd.

State per projected weight: 2 r max(m, n) moment values plus the basis, r min(m, n) values,
instead of AdamW's 2 m n (`TrainingOptimizer.state_bytes` counts them).
"""
from __future__ import annotations

import fnmatch
import math

import torch


def projects_columns(shape) -> bool:
    """True when the basis spans the columns (m >= n: R = G P^T), False for rows (R = Q^T G)."""
    return shape[0] >= shape[1]


def orthogonal_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """P = V^T[:r] [r, n] (m >= n) or Q = U[:, :r] [m, r] from the SVD of the gradient, fp32."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:rank].contiguous() if projects_columns(grad.shape) else u[:, :rank].contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return grad @ basis.t() if projects_columns(grad.shape) else basis.t() @ grad


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, shape) -> torch.Tensor:
    return low_rank @ basis if projects_columns(shape) else basis @ low_rank


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; parameters of groups with `galore_rank` > 0 (2-D) keep their state projected."""

    STATE_KEYS = ("exp_avg", "exp_avg_sq", "basis")  # of a projected parameter

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 update_interval: int = 200, scale: float = 0.25):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, galore_rank=0,
                        update_interval=update_interval, scale=scale)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state, grad, rank = self.state[param], param.grad, group["galore_rank"]
        step = int(state.get("step", 0))  # updates so far (a checkpoint may restore it as a tensor)
        if rank:
            if "basis" not in state or step % group["update_interval"] == 0:
                state["basis"] = orthogonal_basis(grad, rank)
            grad = project(grad, state["basis"])
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        step += 1
        state["step"] = step
        lr, (beta1, beta2), exp_avg, exp_avg_sq = group["lr"], group["betas"], state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        if not rank:
            param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        direction = project_back(exp_avg / denom, state["basis"], param.shape)
        param.add_(direction, alpha=-step_size * group["scale"])

    def projected_params(self) -> list:
        return [p for group in self.param_groups if group["galore_rank"] for p in group["params"]]

    def projected_state(self, names: dict) -> dict:
        """{"<name>.<state key>": tensor} of the projected parameters (names: id(tensor) -> name).
        These shapes and bases belong to this rank's shard, so they are saved per TP place."""
        return {f"{names[id(p)]}.{key}": self.state[p][key]
                for p in self.projected_params() for key in self.STATE_KEYS if key in self.state[p]}

    def load_projected_state(self, names: dict, tensors: dict, step: int) -> int:
        """Inverse of projected_state, at update count `step`; returns how many parameters got
        their state back (the others start afresh: new basis and zero moments next step)."""
        restored = 0
        for param in self.projected_params():
            found = {key: tensors.get(f"{names[id(param)]}.{key}") for key in self.STATE_KEYS}
            if all(value is not None for value in found.values()):
                self.state[param].update({key: value.to(param.device) for key, value in found.items()}, step=step)
                restored += 1
        return restored


def galore_options(optim_cfg):
    """options_of(piece) for `param_groups`: the projection rank for targeted 2-D weights."""
    def options_of(piece) -> dict:
        targeted = piece.param.dim() == 2 and any(fnmatch.fnmatchcase(piece.name, p) for p in optim_cfg.galore_targets)
        return {"galore_rank": optim_cfg.galore_rank} if targeted else {}
    return options_of
