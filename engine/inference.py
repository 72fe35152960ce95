"""Models that only run forward (generation, a frozen reference or reward model): building this
rank's pipeline chunks, loading their weights from a checkpoint of any layout, and moving one
input through every pipeline stage.

The training loop's pipeline schedules exchange tensors of one fixed shape; a forward pass here
may carry any shape (a prompt, then one token at a time; another model's hidden size), so
stages hand their output to the next with plain send/recv of a shape every rank knows.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from engine.checkpoint import (CheckpointError, check_keys, check_same_model, read_entries, read_meta,
                               resolve_step_dir, stored_shapes)
from engine.checkpoint_state import model_entries
from models.config import ModelConfig
from models.gpt import GPTModel
from models.pipeline_split import chunk_layer_ids, model_stage


def build_chunks(model_cfg: ModelConfig, grid, rng, device, dtype, seed: int, vpp: int = 1,
                 pipeline_layers: str = "") -> list:
    """This rank's chunks (virtual stage c is model stage c * pp + pp_rank), initialised from
    `seed` as training would be, in eval mode."""
    chunks = []
    for chunk in range(vpp):
        stage = model_stage(grid.pp_rank, chunk, grid.pp)
        layer_ids = chunk_layer_ids(model_cfg.num_layers, grid.pp, vpp, grid.pp_rank, chunk, pipeline_layers)
        model = GPTModel(model_cfg, grid.tp_group, rng, layer_ids=layer_ids, pre_process=stage == 0,
                         post_process=stage == grid.pp * vpp - 1, device=device)
        model.init_weights(seed)
        chunks.append(model.to(dtype).eval())
    return chunks


def freeze(chunks) -> list:
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def load_model_weights(chunks, grid, root: str, model_cfg: ModelConfig, step: int = -1,
                       optional_prefixes: tuple = ()) -> str:
    """Read the weights of checkpoint `root` (any saved layout) into `chunks`; collective over
    the TP group. Keys under `optional_prefixes` (a head the checkpoint's model did not have)
    keep their initial values when the checkpoint lacks them. Returns the step directory."""
    step_dir = resolve_step_dir(root, step)
    meta = read_meta(step_dir)
    check_same_model(step_dir, meta, model_cfg, grid.tp)
    shapes = stored_shapes(step_dir)
    entries = model_entries(chunks, grid.mesh["tp"], for_load=True)
    entries = {k: v for k, v in entries.items() if k in shapes or not k.startswith(tuple(optional_prefixes))}
    check_keys(step_dir, entries, shapes)
    read_entries(step_dir, entries)
    return step_dir


def checkpoint_model_config(root: str, step: int = -1) -> ModelConfig:
    """The architecture a checkpoint was saved with."""
    meta = read_meta(resolve_step_dir(root, step))
    try:
        return ModelConfig(**meta["model"])
    except TypeError as error:
        raise CheckpointError(f"checkpoint {root} describes a model this version cannot build ({error})") from None


@contextlib.contextmanager
def sequence_parallel_off(chunks):
    """Run whole sequences on every TP rank (one new token cannot be split along the sequence).
    Sequence parallelism only re-partitions the same arithmetic, so the outputs are unchanged."""
    switched = [m for chunk in chunks for m in chunk.modules() if getattr(m, "sequence_parallel", False) is True]
    for module in switched:
        module.sequence_parallel = False
    try:
        yield
    finally:
        for module in switched:
            module.sequence_parallel = True


def init_pipeline_p2p(grid, device) -> None:
    """NCCL wants a group's first operation to be a collective before any send/recv on it."""
    if grid.pp > 1:
        dist.all_reduce(torch.zeros(1, device=device), group=grid.pp_group)


def forward_through_stages(chunks, grid, run_chunk, hidden_shape: tuple, dtype: torch.dtype, device):
    """Run model stage 0, 1, ... in order, each on the rank that holds it: `run_chunk(chunk,
    input)` gets None on the first stage and the previous stage's output elsewhere. Returns the
    last model stage's output on the rank holding it, None on the others. Every rank of the
    pipeline must call this with the same `hidden_shape` (what travels between stages)."""
    pp, stages = grid.pp, grid.pp * len(chunks)
    output = None
    for stage in range(stages):
        owner = stage % pp
        if owner != grid.pp_rank:
            continue
        hidden = None
        if stage > 0 and pp > 1:
            hidden = torch.empty(hidden_shape, dtype=dtype, device=device)
            dist.recv(hidden, src=grid.pp_global_rank((stage - 1) % pp), group=grid.pp_group)
        elif stage > 0:
            hidden = output
        output = run_chunk(chunks[stage // pp], hidden)
        if stage < stages - 1:
            output = output.to(dtype)
            if pp > 1:
                dist.send(output.contiguous(), dst=grid.pp_global_rank((stage + 1) % pp), group=grid.pp_group)
    return output if grid.pp_rank == (stages - 1) % pp else None


def broadcast_from_last_stage(tensor: torch.Tensor, grid) -> torch.Tensor:
    """The last pipeline stage's `tensor` on every stage (same shape and dtype everywhere)."""
    if grid.pp > 1:
        dist.broadcast(tensor, grid.pp_global_rank(grid.pp - 1), group=grid.pp_group)
    return tensor
