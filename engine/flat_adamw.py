"""AdamW over whole bucket shards: one pass that updates the fp32 masters and moments and writes
the bf16/fp16 model weights (docs/optimizer.md "Flat AdamW").

Masters, gradients and weights of a bucket shard are already flat (`MasterShard`); this keeps
the two moments flat too, one tensor a shard, and updates a run of neighbouring pieces that
share a param group with one `loader.adamw_step` call (csrc/adamw.cu on a GPU): 34 bytes an
element in one pass, where torch's fused AdamW and the master-to-model copy move 38 in two.

The torch AdamW stays as the keeper of param groups (the LR scheduler writes their lr) and of
the state the checkpoint code reads: each piece's `inner.state` entry holds views of the flat
moments and its own "step" tensor, so `param_state_by_name`, `state_dict` and the load paths
see what they always saw. A load replaces those tensors; `adopt_state` copies them back into
the flat moments and registers the views again.
"""
from __future__ import annotations

import dataclasses

import torch

from csrc import loader


@dataclasses.dataclass
class Run:
    """Neighbouring pieces of one shard in one param group: views of [lo, hi) of the shard. The
    group is kept by its index: torch's load_state_dict replaces the group dicts."""
    group_index: int
    master: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    model: torch.Tensor


def runs_of(shard, exp_avg, exp_avg_sq, group_index_of: dict) -> list:
    """The shard's maximal runs of pieces that share a param group, in buffer order. A run also
    covers the padding between its pieces: padding holds zeros in master, grad and moments, and
    an AdamW step maps zeros to zeros, so one longer call costs nothing wrong and saves launches."""
    bounds = []  # [group index, lo, hi]
    for piece, lo, hi in shard.spans:
        group = group_index_of[id(piece.main)]
        if bounds and bounds[-1][0] == group:
            bounds[-1][2] = hi
        else:
            bounds.append([group, lo, hi])
    return [Run(group, shard.master[lo:hi], shard.grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], shard.model[lo:hi])
            for group, lo, hi in bounds]


class FlatAdamW:
    """Steps `inner` (a torch AdamW over the pieces' masters) shard by shard, without calling it."""

    def __init__(self, inner: torch.optim.AdamW, shards: list):
        if any(group.get("amsgrad") or group.get("maximize") for group in inner.param_groups):
            raise ValueError("flat AdamW implements plain AdamW: no amsgrad, no maximize")
        self.inner, self.shards = inner, shards
        self.exp_avg = [torch.zeros_like(shard.master) for shard in shards]
        self.exp_avg_sq = [torch.zeros_like(shard.master) for shard in shards]
        group_index_of = {id(p): index for index, group in enumerate(inner.param_groups) for p in group["params"]}
        self.runs = [run for shard, m, v in zip(shards, self.exp_avg, self.exp_avg_sq)
                     for run in runs_of(shard, m, v, group_index_of)]
        # torch's fused AdamW keeps "step" on the parameter's device, the others on the CPU.
        self.step_on_device = bool(inner.defaults.get("fused"))
        self.steps = 0  # updates taken: the bias corrections' exponent, kept on the host (no sync)
        self.step_tensors = []
        self.adopt_state()

    def spans(self):
        """(piece, exp_avg view, exp_avg_sq view) of every piece, the views in the piece's shape."""
        for shard, m, v in zip(self.shards, self.exp_avg, self.exp_avg_sq):
            for piece, lo, hi in shard.spans:
                yield piece, m[lo:hi].view(piece.main.shape), v[lo:hi].view(piece.main.shape)

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One update from the pieces' gradients times `grad_scale` (a 0-d tensor, the clip
        factor, read on the device; None: unscaled); writes the model weights too."""
        self.steps += 1
        torch._foreach_add_(self.step_tensors, 1.0)  # the per-piece counts a checkpoint records
        groups = self.inner.param_groups  # read each step: the LR scheduler writes their lr
        for run in self.runs:
            group = groups[run.group_index]
            beta1, beta2 = group["betas"]
            loader.adamw_step(run.master, run.grad, run.exp_avg, run.exp_avg_sq, run.model, lr=group["lr"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                              step=self.steps, grad_scale=grad_scale)

    def adopt_state(self) -> None:
        """Take the per-piece state in `inner.state` (loaded tensors, or the views already there)
        into the flat moments, and register views of them and fresh step tensors as the state."""
        counts = set()
        for piece, exp_avg, exp_avg_sq in self.spans():
            state = self.inner.state.get(piece.main, {})
            for key, flat_view in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if key in state:
                    flat_view.copy_(state[key].reshape(flat_view.shape))
                else:
                    flat_view.zero_()
            counts.add(int(float(state["step"])) if "step" in state else 0)
        if len(counts) > 1:
            raise ValueError(f"flat AdamW needs one step count for every parameter; the state holds {sorted(counts)}")
        self.steps = counts.pop() if counts else 0
        self.step_tensors = []
        for piece, exp_avg, exp_avg_sq in self.spans():
            step = torch.tensor(float(self.steps), dtype=torch.float32,
                                device=piece.main.device if self.step_on_device else "cpu")
            self.step_tensors.append(step)
            self.inner.state[piece.main] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def use_flat_adamw(setting: str, optimizer_name: str, device: torch.device, pieces) -> bool:
    """optim.flat_adamw resolved: "auto" is on for AdamW on a GPU; "true" anywhere (the CPU runs
    the same math in torch ops). Either way only when every piece has an fp32 master of 16-bit
    weights (fp32 weights keep torch's AdamW: there is no second copy to write)."""
    wanted = setting == "true" or (setting == "auto" and device.type == "cuda")
    return wanted and optimizer_name == "adamw" and bool(pieces) and all(piece.has_master for piece in pieces)
