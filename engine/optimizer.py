"""Optimizer construction and the step around it.

`TrainingOptimizer` owns everything between "gradients are accumulated" and "weights are
updated": the sequence-parallel and data-parallel gradient reductions, the global gradient
norm and clipping, and the inner torch optimizer. The loop only calls `zero_grad`,
`scale_loss`, `step` and the state-dict pair, so the distributed (sharded) optimizer and mixed
precision can replace the internals without the loop changing.
"""
from __future__ import annotations

import torch

from engine.checkpoint_state import adam_param_state_by_name, load_adam_param_state
from parallel.gradients import (
    all_reduce_coalesced,
    clip_grads,
    global_grad_norm,
    grads_of,
    reduce_sequence_parallel_grads,
)


def is_decayed(name: str, param) -> bool:
    """Weight decay applies to matrices (linears, embeddings), never to norms or biases."""
    return param.dim() >= 2 and "norm" not in name


def param_groups(named_params, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if is_decayed(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_torch_optimizer(groups, train_cfg, device: torch.device):
    fast_path = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                             eps=train_cfg.adam_eps, **fast_path)


class TrainingOptimizer:
    """Plain data parallelism: every DP rank holds the full optimizer state."""

    def __init__(self, model_chunks, grid, train_cfg, device):
        self.grid, self.cfg, self.device = grid, train_cfg, device
        named = [(n, p) for chunk in model_chunks for n, p in chunk.named_parameters()]
        self.named_params = [(n, p) for n, p in named if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.inner = build_torch_optimizer(param_groups(named, train_cfg.weight_decay), train_cfg, device)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def reduce_gradients(self) -> None:
        reduce_sequence_parallel_grads(self.params, self.grid.tp_group)
        all_reduce_coalesced(grads_of(self.params), self.grid.dp_group)

    def step(self) -> dict:
        """Reduce, clip and apply the gradients; returns what the log reports."""
        self.reduce_gradients()
        groups = [self.grid.tp_group, self.grid.pp_group]
        grad_norm = global_grad_norm(self.params, self.grid.tp_rank, groups, self.device)
        clip_grads(self.params, self.cfg.clip_grad, grad_norm)
        self.inner.step()
        return {"grad_norm": grad_norm.item()}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    # Checkpoints use these: state keyed by parameter name, each tensor at the parameter's
    # local TP-shard shape, so it can be saved under the parameter's global key.
    def param_state_by_name(self) -> dict:
        return adam_param_state_by_name(self.inner, self.named_params)

    def load_param_state_by_name(self, state: dict) -> None:
        load_adam_param_state(self.inner, self.named_params, state)


def build_optimizer(model_chunks, grid, train_cfg, device) -> TrainingOptimizer:
    return TrainingOptimizer(model_chunks, grid, train_cfg, device)
