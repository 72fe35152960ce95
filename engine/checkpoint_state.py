"""The layout-free view of a rank's training state that checkpoints read and write.

Every tensor is stored under a GLOBAL key that names what it is in the serial model, never
where it lives at the current layout:

- a parameter is `model.<name>` (layer names already carry the global layer index);
- a TP-split parameter with fused blocks (QKV, SwiGLU's gate/up) is stored as one tensor per
  block, `model.<name>.<block>`: each rank's slice of a block is a contiguous shard of it, so
  it can be described as a DTensor `Shard(dim)` on the 1-D TP mesh and
  `torch.distributed.checkpoint` can reshard it to any other TP size on load;
- optimizer state uses the parameter's key with `optim.` in front and the state name behind.

A tied output layer on the last pipeline stage is a copy of the embedding, so it reads and
writes the embedding's key; layouts with and without pipeline stages then agree.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard

# Fused blocks of a column-parallel weight, in their order inside the full tensor.
BLOCK_NAMES = {"attn.qkv": ("q", "k", "v"), "mlp.fc1": ("gate", "up")}


def block_names(param_name: str, count: int) -> tuple:
    module = param_name.rsplit(".", 1)[0]
    for suffix, names in BLOCK_NAMES.items():
        if module.endswith(suffix) and len(names) == count:
            return names
    return tuple(f"part{i}" for i in range(count))


def checkpoint_name(chunk, name: str) -> str:
    """The serial-model name a parameter is stored under (a tied output layer -> embedding)."""
    return chunk.init_key(name) if hasattr(chunk, "init_key") else name


def is_mirror(chunk, name: str) -> bool:
    """A parameter that only copies another one (tied output layer): loaded, never saved."""
    return checkpoint_name(chunk, name) != name


def stored_block_names(name: str, param) -> tuple:
    """Key suffixes of a parameter's fused blocks. A LoRA B that covers only some blocks of
    its fused base (`base_blocks` = (base block count, chosen indices)) is named after those
    blocks, so `q` and `v` adapters are stored as `.q` and `.v`, whatever else is targeted."""
    base_blocks = getattr(param, "base_blocks", None)
    if base_blocks is None:
        return block_names(name, len(param.shard_spec.parts)) if len(param.shard_spec.parts) > 1 else ()
    total, chosen = base_blocks
    names = block_names(name, total)
    return tuple(names[index] for index in chosen)


def local_blocks(name: str, local: torch.Tensor, param):
    """(key suffix, view of `local`) for each fused block this rank holds."""
    spec, names = param.shard_spec, stored_block_names(name, param)
    if not names:  # one block (e.g. GPT-2's fc1) is just the tensor
        return [("", local)]
    pieces, offset = [], 0
    for block, (_, length) in zip(names, spec.local_slices()):
        pieces.append(("." + block, local.narrow(spec.dim, offset, length)))
        offset += length
    return pieces


def as_global(local: torch.Tensor, spec, tp_mesh):
    """A TP-split block as a DTensor (its global shape inferred from equal shards); a
    replicated tensor as itself (DCP keeps one copy of identical replicas)."""
    if not spec.is_split:
        return local
    return DTensor.from_local(local, tp_mesh, [Shard(spec.dim)], run_check=False)


def add_entry(entries: dict, key: str, stored, view) -> None:
    """entries[key] = (tensor DCP reads/writes, [local views it fills on load]). A key met
    twice (a rank holding both the embedding and a tied copy of it) fills both views."""
    if key in entries:
        entries[key][1].append(view)
    else:
        entries[key] = (stored, [view])


def sharded_entries(chunks, tp_mesh, prefix: str, tensor_of, include_mirrors: bool) -> dict:
    """Entries for the tensors `tensor_of(name, param)` returns (a tensor of the parameter's
    local shape, or None to skip), under `prefix` + the global key."""
    entries = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if is_mirror(chunk, name) and not include_mirrors:
                continue
            tensor = tensor_of(name, param)
            if tensor is None:
                continue
            base = f"{prefix}{checkpoint_name(chunk, name)}"
            for suffix, view in local_blocks(name, tensor, param):
                add_entry(entries, base + suffix, as_global(view, param.shard_spec, tp_mesh), view)
    return entries


def model_entries(chunks, tp_mesh, for_load: bool, trainable_only: bool = False) -> dict:
    """Parameters under `model.<key>`; trainable_only leaves out frozen ones (a LoRA run's base,
    which is loaded from finetune.base instead)."""
    def tensor_of(name, param):
        return param.detach() if param.requires_grad or not trainable_only else None

    return sharded_entries(chunks, tp_mesh, "model.", tensor_of, include_mirrors=for_load)


def optimizer_entries(chunks, tp_mesh, param_state: dict, for_load: bool) -> dict:
    """Optimizer state per parameter under `optim.<key>.<state name>`; tensors shaped like the
    parameter are sharded like it, scalars (Adam's step) are replicated and stored whole."""
    entries = {}
    for state_name in sorted({k for state in param_state.values() for k in state}):
        def tensor_of(name, param, state_name=state_name):
            value = param_state.get(name, {}).get(state_name)
            return value if value is None or value.dim() > 0 else None

        for key, (stored, views) in sharded_entries(chunks, tp_mesh, "optim.", tensor_of, for_load).items():
            for view in views:
                add_entry(entries, f"{key}.{state_name}", stored, view)
        for chunk in chunks:
            for name, _ in chunk.named_parameters():
                value = param_state.get(name, {}).get(state_name)
                if value is not None and value.dim() == 0 and (for_load or not is_mirror(chunk, name)):
                    add_entry(entries, f"optim.{checkpoint_name(chunk, name)}.{state_name}", value, value)
    return entries


def optimizer_load_targets(chunks, stored_shapes: dict) -> dict:
    """{param name: {state name: zeros at the local shape}} for every optimizer state the
    checkpoint holds (`stored_shapes`: key -> full shape) for a parameter of these chunks.
    State names never contain dots, so a key is `optim.<tensor key>.<state name>`."""
    states_by_key = {}
    for key, shape in stored_shapes.items():
        if key.startswith("optim."):
            tensor_key, state_name = key.rsplit(".", 1)
            states_by_key.setdefault(tensor_key, {})[state_name] = len(shape) == 0
    targets = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            base = f"optim.{checkpoint_name(chunk, name)}"
            candidates = [base] + [base + suffix for suffix, _ in local_blocks(name, param.detach(), param)]
            for tensor_key in candidates:
                for state_name, is_scalar in states_by_key.get(tensor_key, {}).items():
                    # fp32 whatever the weight's dtype: masters and moments are saved in fp32, and a
                    # bf16 target would round them on load (a resume would not be bit for bit).
                    empty = torch.zeros((), dtype=torch.float32) if is_scalar else torch.zeros_like(
                        param.detach(), dtype=torch.float32)
                    targets.setdefault(name, {})[state_name] = empty
    return targets
