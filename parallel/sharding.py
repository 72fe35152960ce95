"""How a rank's parameter relates to the full (serial) parameter.

Every parameter of a parallel layer carries a `ShardSpec`: the full shape, the dimension it
is split along (None when every TP rank holds the whole tensor) and the fused sub-blocks along
that dimension (QKV, gate/up), each of which is split evenly across ranks. Initialisation,
gathering for parity tests, checkpoints with global keys and HF conversion all use this one
description, so they agree on the layout by construction.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from parallel import comm


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    full_shape: tuple
    dim: int | None = None
    parts: tuple = ()
    rank: int = 0
    size: int = 1

    @property
    def is_split(self) -> bool:
        return self.dim is not None and self.size > 1

    def _part_sizes(self) -> tuple:
        return self.parts or (self.full_shape[self.dim],)

    def local_shape(self) -> tuple:
        if self.dim is None:
            return tuple(self.full_shape)
        shape = list(self.full_shape)
        shape[self.dim] = sum(p // self.size for p in self._part_sizes())
        return tuple(shape)

    def local_slices(self):
        """(full_start, length) of each piece this rank holds along `dim`, in local order."""
        pieces, offset = [], 0
        for part in self._part_sizes():
            step = part // self.size
            pieces.append((offset + self.rank * step, step))
            offset += part
        return pieces

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor."""
        if self.dim is None:
            return full
        return torch.cat([full.narrow(self.dim, start, length) for start, length in self.local_slices()], self.dim)

    def gather(self, local: torch.Tensor, group) -> torch.Tensor:
        """The full tensor rebuilt from every rank's shard (collective over `group`)."""
        if not self.is_split:
            return local
        gathered = comm.all_gather_dim(local, group, self.dim).chunk(self.size, self.dim)
        blocks = []
        for index, part in enumerate(self._part_sizes()):
            step = part // self.size
            offset = sum(p // self.size for p in self._part_sizes()[:index])
            blocks.extend(g.narrow(self.dim, offset, step) for g in gathered)
        return torch.cat(blocks, self.dim)


def check_divisible(parts, size: int, what: str) -> None:
    for part in parts:
        if part % size:
            raise ValueError(f"{what}: size {part} is not divisible by tensor-parallel size {size}")


def attach(param: torch.nn.Parameter, spec: ShardSpec) -> torch.nn.Parameter:
    param.shard_spec = spec
    return param


def seed_for(seed: int, key: str) -> int:
    """A stable 63-bit seed per (run seed, parameter name): the same on every layout."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _full_generator(param: torch.Tensor, key: str, seed: int) -> torch.Generator:
    return torch.Generator(device=param.device).manual_seed(seed_for(seed, key))


@torch.no_grad()
def init_from_full(param: torch.Tensor, key: str, seed: int, std: float) -> None:
    """Fill `param` with its shard of a full N(0, std) tensor drawn from a per-key seed."""
    spec: ShardSpec = param.shard_spec
    full = torch.empty(spec.full_shape, dtype=torch.float32, device=param.device)
    full.normal_(0.0, std, generator=_full_generator(param, key, seed))
    param.copy_(spec.slice(full))


@torch.no_grad()
def init_uniform_from_full(param: torch.Tensor, key: str, seed: int, bound: float) -> None:
    """Fill `param` with its shard of a full U(-bound, bound) tensor drawn from a per-key seed."""
    spec: ShardSpec = param.shard_spec
    full = torch.empty(spec.full_shape, dtype=torch.float32, device=param.device)
    full.uniform_(-bound, bound, generator=_full_generator(param, key, seed))
    param.copy_(spec.slice(full))
