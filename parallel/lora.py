"""LoRA adapters on the tensor-parallel linears, added without changing the model code.

`apply_lora` gives each targeted linear two parameters, `<module>.lora_A` [r, in] and
`<module>.lora_B` [out, r], and replaces its `linear_fn` by one that adds
scale * B (A dropout(x)) to the base product. Both layouts are exact (equal to the serial
model up to fp32 summation order) and need no collective of their own:

- ColumnParallelLinear (x whole, W split by output rows): A is whole (replicated over TP), B is
  split by output rows like W, with the same fused blocks, so each rank's B rows line up with
  its W rows. Every rank sees the same x but only its own rows of B, so A's gradient on a rank
  is a partial sum over those rows: it is marked `tp_partial_grad` and summed over TP.
- RowParallelLinear (x split by input columns): A is split by input columns like W and B is
  whole. `linear_fn` runs before the base's reduction, so the low-rank partial
  x_local A_local^T goes through B on each rank and the base's all-reduce (or, under sequence
  parallelism, reduce-scatter) sums B h_r over ranks, which equals B (sum_r h_r) because B is
  linear. A's gradient is then exactly this rank's columns; B's is dy^T h_r, a partial sum, so
  B is marked `tp_partial_grad` too. Sequence parallelism needs nothing extra: the column
  base's input is already gathered, the row base's output already reduce-scattered.

QLoRA: with an NF4 base (`parallel/nf4.enable_nf4` first) the layer has no `weight`; the
layout then comes from `layer.nf4.shard_spec` and the base product from the NF4 `linear_fn`
that the adapter wraps.

Targets are fnmatch patterns over linear module names (`layers.*.attn.qkv`) or aliases that a
model supplies (`q` -> block 0 of the fused qkv). Targeting some blocks of a fused linear gives
B rows only for those blocks; the other blocks' rows of the update are zero.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel import frozen_lora_linear, main_grad_linear, nf4
from parallel.layers import ColumnParallelLinear, RowParallelLinear
from parallel.sharding import ShardSpec, attach, init_uniform_from_full

ALL_BLOCKS = None


class LoRALinearFn:
    """The `linear_fn` of an adapted linear: base product plus the scaled low-rank update.
    A plain object (not a Module), so the adapter parameters stay named `<module>.lora_A/B`."""

    def __init__(self, module, base_fn, scale: float, dropout: float, blocks, rng):
        self.module, self.base_fn, self.scale = module, base_fn, scale
        self.dropout, self.blocks, self.rng = dropout, blocks, rng
        self.enabled = True  # off: the base linear alone (DPO's reference model, adapters_disabled)

    def __call__(self, x, weight, bias=None):
        if not self.enabled:
            return self.base_fn(x, weight, bias)
        if self.fuses(weight, bias):
            holder = self.base_fn.holder if isinstance(self.base_fn, nf4.NF4LinearFn) else None
            return frozen_lora_linear.frozen_base_lora_linear(x, self.module.lora_A, self.module.lora_B, weight, bias,
                                                              holder, self.scale)
        return self.composed(x, weight, bias)

    @property
    def dropout_active(self) -> bool:
        return self.dropout > 0 and self.module.training

    def fuses(self, weight, bias) -> bool:
        """Whether parallel/frozen_lora_linear.py computes this call: every block adapted, no
        adapter dropout (its mask would have to be saved), a frozen bias or none, and a frozen
        base the Function reproduces (an NF4 linear, or the default linear over a frozen weight)."""
        if self.blocks is not ALL_BLOCKS or self.dropout_active or (bias is not None and bias.requires_grad):
            return False
        if isinstance(self.base_fn, nf4.NF4LinearFn):
            return weight is None
        return self.base_fn is main_grad_linear.linear and not weight.requires_grad

    def composed(self, x, weight, bias=None):
        """The adapted linear from separate ops: any base, adapter dropout, some fused blocks."""
        base = self.base_fn(x, weight, bias)
        low_rank = F.linear(self.drop(x), self.module.lora_A)
        if self.blocks is not ALL_BLOCKS:
            update = expand_blocks(F.linear(low_rank, self.module.lora_B), self.module, self.blocks, dim=-1)
            return base + update * self.scale
        # One GEMM adds scale * (low_rank B^T) to the base product: no [tokens, out] update
        # tensor and no separate scale and add passes over it.
        flat = torch.addmm(base.reshape(-1, base.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                           self.module.lora_B.t(), alpha=self.scale)
        return flat.view(base.shape)

    def drop(self, x):
        if not self.dropout_active:
            return x
        # A row-parallel input is split over TP: its slices need distinct masks, as the base's
        # own TP-split dropout does. A column-parallel input is the same on every TP rank.
        split_input = isinstance(self.module, RowParallelLinear) and self.module.tp > 1
        ctx = self.rng.fork() if split_input and self.rng is not None else contextlib.nullcontext()
        with ctx:
            return F.dropout(x, self.dropout, training=True)


def base_spec(module):
    """The base weight's ShardSpec; an NF4 base (QLoRA) has no `weight` but keeps it on `nf4`."""
    return module.weight.shard_spec if module.weight is not None else module.nf4.shard_spec


def base_factory(module) -> dict:
    """Device and dtype the adapters take: the base weight's (an NF4 base's original dtype)."""
    if module.weight is not None:
        return dict(device=module.weight.device, dtype=module.weight.dtype)
    return dict(device=module.nf4.packed.device, dtype=module.nf4.dtype)


def local_part_sizes(module) -> tuple:
    """Sizes of the fused output blocks this rank holds (one block for a row-parallel base)."""
    spec = base_spec(module)
    parts = spec.parts or (spec.full_shape[0],)
    return tuple(p // spec.size for p in parts) if spec.dim == 0 else tuple(parts)


def expand_blocks(tensor, module, blocks, dim: int):
    """`tensor` holds only the targeted blocks along `dim`; put zeros where the others go."""
    if blocks is ALL_BLOCKS:
        return tensor
    sizes, pieces, taken = local_part_sizes(module), [], 0
    for index, size in enumerate(sizes):
        if index in blocks:
            pieces.append(tensor.narrow(dim, taken, size))
            taken += size
        else:
            shape = list(tensor.shape)
            shape[dim] = size
            pieces.append(tensor.new_zeros(shape))
    return torch.cat(pieces, dim)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA, stable at large ranks)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adapter_specs(module, rank: int, blocks) -> tuple:
    """ShardSpecs of (A, B) for a base linear: see the module docstring for the layout."""
    base = base_spec(module)
    if isinstance(module, ColumnParallelLinear):
        parts = base.parts or (base.full_shape[0],)
        chosen = parts if blocks is ALL_BLOCKS else tuple(parts[i] for i in sorted(blocks))
        b_parts = chosen if blocks is not ALL_BLOCKS or len(chosen) > 1 else ()
        return (ShardSpec((rank, module.in_features)),
                ShardSpec((sum(chosen), rank), 0, b_parts, base.rank, base.size))
    return (ShardSpec((rank, module.in_features), 1, (), base.rank, base.size),
            ShardSpec((module.out_features, rank)))


def add_adapter(module, name: str, rank: int, scale: float, dropout: float, blocks, seed: int, rng) -> None:
    a_spec, b_spec = adapter_specs(module, rank, blocks)
    factory = base_factory(module)
    lora_a = attach(nn.Parameter(torch.empty(a_spec.local_shape(), **factory)), a_spec)
    lora_b = attach(nn.Parameter(torch.zeros(b_spec.local_shape(), **factory)), b_spec)
    # As the LoRA paper and PEFT: A Kaiming-uniform (a = sqrt(5), bound 1/sqrt(in)), B = 0, so
    # training starts from the base model. The full A comes from a per-name seed: every layout
    # starts equal.
    init_uniform_from_full(lora_a, f"{name}.lora_A", seed, 1.0 / math.sqrt(module.in_features))
    if blocks is not ALL_BLOCKS:
        # Which base blocks B's rows belong to: checkpoints name B's blocks after them.
        lora_b.base_blocks = (len(local_part_sizes(module)), tuple(sorted(blocks)))
    partial = lora_a if isinstance(module, ColumnParallelLinear) else lora_b
    partial.tp_partial_grad = True
    module.register_parameter("lora_A", lora_a)
    module.register_parameter("lora_B", lora_b)
    module.linear_fn = LoRALinearFn(module, module.linear_fn, scale, dropout, blocks, rng)


def resolve_targets(linears: dict, targets, aliases: dict) -> dict:
    """{module name: ALL_BLOCKS or a set of block indices} for the linears the targets name."""
    chosen = {}
    for target in targets:
        pattern, block = aliases.get(target, (target, ALL_BLOCKS))
        for name in fnmatch.filter(linears, pattern):
            count = len(local_part_sizes(linears[name]))
            if block is not ALL_BLOCKS and block >= count:
                raise ValueError(f"LoRA target {target!r}: module {name} has {count} fused block(s), "
                                 f"not a block {block}")
            if block is ALL_BLOCKS or chosen.get(name, set()) is ALL_BLOCKS:
                chosen[name] = ALL_BLOCKS
            else:
                blocks = chosen.get(name, set()) | {block}
                chosen[name] = ALL_BLOCKS if len(blocks) == count else blocks  # every block: the whole module
    return chosen


def apply_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
               seed: int = 0, aliases: dict | None = None, rng=None) -> list:
    """Add adapters to the tensor-parallel linears of `model` that `targets` name and freeze
    every other parameter. aliases: {alias: (pattern, fused block index or None)}; rng: the
    model's RNGTracker (TP-distinct dropout on row-parallel inputs). Returns the adapted
    module names (possibly none on a pipeline stage without a targeted layer)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for param in model.parameters():
        param.requires_grad_(False)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    chosen = resolve_targets(linears, targets, aliases or {})
    scale = lora_scale(alpha, rank, rslora)
    for name, blocks in chosen.items():
        if hasattr(linears[name], "lora_A"):
            raise ValueError(f"module {name} already has a LoRA adapter")
        add_adapter(linears[name], name, rank, scale, dropout, blocks, seed, rng)
    return sorted(chosen)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list:
    """Fold every adapter into its base weight (W += scale * B A, on each rank's own shard, no
    communication), restore the plain linear and drop the adapter. Returns the merged names."""
    merged = []
    for name, module in model.named_modules():
        fn = getattr(module, "linear_fn", None)
        if not isinstance(fn, LoRALinearFn):
            continue
        if module.weight is None:
            raise ValueError(f"merge_lora: {name} has an NF4 base (QLoRA); merge the adapters into the full-precision "
                             "base checkpoint instead (tools/merge_lora.py)")
        full_b = expand_blocks(module.lora_B.float(), module, fn.blocks, dim=0)
        module.weight.add_((full_b @ module.lora_A.float() * fn.scale).to(module.weight.dtype))
        module.linear_fn = fn.base_fn
        del module.lora_A, module.lora_B
        merged.append(name)
    return merged


@contextlib.contextmanager
def adapters_disabled(models):
    """Run `models` as their base: every adapter's update is skipped (the weights stay where
    they are), e.g. for DPO's reference pass without a second copy of the base."""
    fns = [m.linear_fn for model in models for m in model.modules()
           if isinstance(getattr(m, "linear_fn", None), LoRALinearFn)]
    for fn in fns:
        fn.enabled = False
    try:
        yield
    finally:
        for fn in fns:
            fn.enabled = True


def adapter_parameters(model: nn.Module) -> dict:
    """{name: parameter} of every LoRA adapter in `model`."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
