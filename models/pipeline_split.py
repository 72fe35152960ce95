"""Which transformer layers each pipeline stage holds.

The model is cut into pp x vpp model stages. Rank r's virtual chunk c holds model stage
c * pp + r (Megatron's interleaving), so with vpp > 1 consecutive layers travel round the ring
of ranks vpp times. Layers are split evenly unless `parallel.pipeline_layers` lists the count
of every model stage ("3,2,2").
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
