"""Which transformer layers each pipeline stage holds.

The model is cut into pp x vpp model stages. Rank r's virtual chunk c holds model stage
c * pp + r (Megatron's interleaving), so with vpp > 1 consecutive layers travel round the ring
of ranks vpp times. Layers are split evenly unless `parallel.pipeline_layers` lists the count
of every model stage ("3,2,2") or says "auto": then the last rank, which also runs the output
layer and the loss, gets fewer layers (`balanced_layer_counts`).
"""
from __future__ import annotations


def parse_layer_counts(text: str) -> list:
    """ "3,2,2" -> [3, 2, 2]; "" -> [] (even split)."""
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"parallel.pipeline_layers: expected comma-separated whole numbers, got {text!r}") from None


def stage_layer_counts(num_layers: int, pp: int, vpp: int = 1, explicit: str = "") -> list:
    """Number of layers of each model stage, in model order; ValueError naming the key if impossible."""
    stages = pp * vpp
    counts = parse_layer_counts(explicit)
    if not counts:
        if num_layers % stages:
            what = f"parallel.pp x parallel.vpp = {pp} x {vpp}" if vpp > 1 else f"parallel.pp={pp}"
            raise ValueError(f"model.num_layers: {num_layers} layers do not split evenly over {what}; "
                             f"use a multiple of {stages} or list each stage's layers in parallel.pipeline_layers")
        return [num_layers // stages] * stages
    if len(counts) != stages:
        raise ValueError(f"parallel.pipeline_layers: needs one count per model stage (parallel.pp x parallel.vpp "
                         f"= {stages}), got {len(counts)} in {explicit!r}")
    if min(counts) < 1:
        raise ValueError(f"parallel.pipeline_layers: every stage needs at least one layer, got {explicit!r}")
    if sum(counts) != num_layers:
        raise ValueError(f"parallel.pipeline_layers: counts {explicit!r} sum to {sum(counts)}, "
                         f"not model.num_layers={num_layers}")
    return counts


def model_stage(pp_rank: int, chunk: int, pp: int) -> int:
    """Position in the model of rank `pp_rank`'s virtual chunk `chunk`."""
    return chunk * pp + pp_rank


def chunk_layer_ids(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int, explicit: str = "") -> list:
    """Global indices of the layers held by rank `pp_rank`'s virtual chunk `chunk`."""
    counts = stage_layer_counts(num_layers, pp, vpp, explicit)
    stage = model_stage(pp_rank, chunk, pp)
    first = sum(counts[:stage])
    return list(range(first, first + counts[stage]))


def balanced_layer_counts(num_layers: int, pp: int, vpp: int, output_cost: float) -> list:
    """Per-model-stage layer counts that even out the ranks' work when the last rank also runs
    the output layer, worth `output_cost` layers. Ranks get layer totals minimising the busiest
    rank's work (ties: fewer layers on the first ranks, which hold the most micro-batches'
    activations under 1F1B); each rank's total is then spread as evenly as it goes over its
    vpp chunks. Every chunk keeps at least one layer."""
    if num_layers < pp * vpp:
        raise ValueError(f"parallel.pipeline_layers: auto needs at least one layer per model stage "
                         f"({pp} x {vpp}), the model has {num_layers}")
    if pp == 1:
        return _even(num_layers, vpp)
    splits = [_even(num_layers - last, pp - 1) + [last] for last in range(vpp, num_layers - (pp - 1) * vpp + 1)]
    splits = [split for split in splits if min(split) >= vpp]
    # The busiest rank's work, rounded so that equal loads tie; then the most layers on the last rank.
    totals = min(splits, key=lambda split: (round(max(split[:-1] + [split[-1] + output_cost]), 9), -split[-1]))
    per_rank = [_even(total, vpp) for total in totals]
    return [per_rank[rank][chunk] for chunk in range(vpp) for rank in range(pp)]


def _even(total: int, parts: int) -> list:
    """`total` split into `parts` near-equal counts, the larger ones last."""
    base, extra = divmod(total, parts)
    return [base + (1 if index >= parts - extra else 0) for index in range(parts)]
