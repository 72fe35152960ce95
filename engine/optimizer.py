"""Optimizer construction: AdamW with weight decay on matrices only (norms and biases excluded)."""
from __future__ import annotations

import torch


def is_decayed(name: str, param) -> bool:
    """Weight decay applies to matrices (linears, embeddings), never to norms or biases."""
    return param.dim() >= 2 and "norm" not in name


def param_groups(model, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, train_cfg, device: torch.device):
    fast_path = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                             betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), eps=train_cfg.adam_eps,
                             **fast_path)
