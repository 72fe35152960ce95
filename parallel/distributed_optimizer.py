"""What each data-parallel rank optimizes: the pieces of parameters inside its shards of the
gradient buffers, with fp32 master copies when the model weights are bf16/fp16.

With sharding, a rank owns 1/dp of each bucket, so a parameter may be cut between ranks; the
rank's optimizer sees flat 1-D pieces. Without sharding a rank owns whole parameters and the
pieces keep the parameter's shape (which factored optimizers such as Adafactor need). The
inner torch optimizer updates `piece.main` (the fp32 master, or the fp32 parameter itself) from
`piece.main.grad`, a view into the reduced fp32 main_grad buffer.
"""
from __future__ import annotations

import dataclasses

import torch

from parallel.gradients import all_reduce_coalesced


@dataclasses.dataclass
class Piece:
    name: str
    param: torch.nn.Parameter
    start: int  # element range of the flattened parameter that this rank owns
    end: int
    main: torch.Tensor  # what the optimizer updates (fp32)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.end == self.param.numel()

    def model_view(self) -> torch.Tensor:
        return self.param.data if self.is_whole else self.param.data.view(-1)[self.start:self.end]

    def grad_view(self) -> torch.Tensor:
        return self.param.main_grad if self.is_whole else self.param.main_grad.view(-1)[self.start:self.end]

    @property
    def has_master(self) -> bool:
        return self.main.data_ptr() != self.model_view().data_ptr()


@dataclasses.dataclass
class MasterShard:
    """A bucket's shard of the model weights (bf16/fp16), its fp32 master and its main_grad, all
    flat and of one layout, so the post-step copy (or a flat optimizer, engine/flat_adamw.py) is
    one kernel a bucket instead of one a parameter."""
    model: torch.Tensor
    master: torch.Tensor
    grad: torch.Tensor
    # (piece, lo, hi): where each piece's master lies in `master`, in buffer order. Padding
    # between parameters (a parameter starts at a multiple of 64 elements) separates the spans.
    spans: list = dataclasses.field(default_factory=list)


def owned_pieces(buffer) -> tuple:
    """This rank's pieces of `buffer` (a GradBuffer), in buffer order, and the flat master
    shards their fp32 masters are views of (none when the weights are fp32 themselves)."""
    pieces, shards = [], []
    for bucket in buffer.buckets:
        shard_start, shard_end = buffer.shard_range(bucket)
        model_flat = buffer.param_data[shard_start:shard_end]
        shard = None
        if model_flat.dtype != torch.float32:
            shard = MasterShard(model_flat, model_flat.detach().float(), buffer.grad_data[shard_start:shard_end])
            shards.append(shard)
        for param in bucket.params:
            p_start, p_end = buffer.param_range(param)
            lo, hi = max(p_start, shard_start), min(p_end, shard_end)
            if lo < hi:
                piece = Piece(buffer.names[param], param, lo - p_start, hi - p_start, main=None)
                view = piece.model_view()
                # fp32 weights are their own master; bf16/fp16 weights get an fp32 copy (the master).
                piece.main = view if shard is None else shard.master[lo - shard_start:hi - shard_start].view(view.shape)
                piece.main.grad = piece.grad_view()
                pieces.append(piece)
                if shard is not None:
                    shard.spans.append((piece, lo - shard_start, hi - shard_start))
    return pieces, shards


def copy_masters_to_model(shards) -> None:
    for shard in shards:
        shard.model.copy_(shard.master)


def gather_state_by_name(named_params, pieces, inner_state, keys, with_master: bool, dp_group) -> dict:
    """{param name: {key: fp32 tensor of the parameter's local (TP) shape}}, complete over DP.
    `keys` (element-wise state keys) and `named_params` are identical on every rank, so every
    rank contributes the same tensors in the same order; pieces are disjoint, so a sum over DP
    assembles each tensor from its owners."""
    keys = list(keys) + (["master"] if with_master else [])
    full = {name: {key: torch.zeros(param.numel(), dtype=torch.float32, device=param.device) for key in keys}
            for name, param in named_params}
    for piece in pieces:
        state = inner_state.get(piece.main, {})
        for key in keys:
            value = piece.main if key == "master" else state[key]
            full[piece.name][key][piece.start:piece.end].copy_(value.reshape(-1))
        for key, value in state.items():  # factored state (Adafactor), only on whole parameters
            if piece.is_whole and torch.is_tensor(value) and value.dim() > 0 and key not in keys:
                full[piece.name][key] = value.detach().clone()
    flats = [tensor for name, _ in named_params for key, tensor in full[name].items() if key in keys]
    if dp_group is not None:  # None: replicated optimizer, this rank already holds everything
        all_reduce_coalesced(flats, dp_group)
    shapes = dict(named_params)
    return {name: {key: t.view(shapes[name].shape) if key in keys else t for key, t in entry.items()}
            for name, entry in full.items()}


def load_state_by_name(pieces, inner_state, state_by_name: dict, step_state) -> None:
    """Keep this rank's slice of every full-over-DP tensor in `state_by_name`."""
    for piece in pieces:
        saved = state_by_name.get(piece.name)
        if saved is None:
            raise KeyError(f"optimizer state has no entry for parameter {piece.name!r}")
        state = inner_state.setdefault(piece.main, {})
        for key, value in saved.items():
            value = value.to(piece.main.device)
            if value.numel() == piece.param.numel():
                local = value.reshape(-1)[piece.start:piece.end].view(piece.main.shape)
                if key == "master":
                    piece.main.copy_(local)
                else:
                    state[key] = local.to(torch.float32).clone()
            elif piece.is_whole:
                state[key] = value.clone()
        if step_state is not None:
            state["step"] = step_state(piece)
