"""The process grid: how the world's ranks split into tensor, context, data and pipeline groups.

Rank order follows Megatron: TP varies fastest, then CP, then DP, then PP, so the ranks of a
TP group are neighbours (one NVLink island) and PP stages are farthest apart. The grid is an
object passed to whatever needs a group; nothing here is a module-level singleton.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

MESH_DIMS = ("pp", "dp", "cp", "tp")


class GridError(ValueError):
    """A layout that the world size cannot hold."""


def check_layout(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """Return the data-parallel size, or raise GridError naming what does not factor."""
    for name, size in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if size < 1:
            raise GridError(f"{name} must be at least 1, got {size}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise GridError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp "
            f"= {tp} x {pp} x {cp} = {model_parallel}"
        )
    return world_size // model_parallel


class StagePosition:
    """Where a rank sits in its pipeline, for anything with `pp_rank` and `pp`."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


@dataclasses.dataclass
class ProcessGrid(StagePosition):
    """TP x CP x DP x PP process groups over one DeviceMesh, with this rank's coordinates."""

    mesh: object
    tp: int
    pp: int
    dp: int
    cp: int
    device: torch.device
    timeout_s: float = 600.0  # every group's collective timeout (parallel.timeout_s)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def group(self, dim: str):
        return self.mesh.get_group(dim)

    def local_rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def tp_group(self):
        return self.group("tp")

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def pp_group(self):
        return self.group("pp")

    @property
    def tp_rank(self) -> int:
        return self.local_rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank("pp")

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of `stage` in this rank's pipeline (same TP, CP and DP coordinates)."""
        return dist.get_process_group_ranks(self.pp_group)[stage]

    def coordinates(self) -> str:
        """This rank's place in the grid, for error messages."""
        return f"tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}"

    @property
    def is_logging_rank(self) -> bool:
        """The single rank that writes logs: last stage, first of its TP/CP/DP groups."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.local_rank("cp") == 0


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group (torchrun's env, or a private one-rank world)."""
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device_type == "cuda":
        # A failed or timed-out NCCL collective aborts the communicator and raises in the
        # caller instead of leaving the rank blocked in a kernel forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = default_backend(device_type)
        if "RANK" in os.environ:
            kwargs = {"device_id": device} if device_type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            store_file = tempfile.mktemp(prefix="trellis_store_")
            dist.init_process_group(backend, init_method=f"file://{store_file}", rank=0, world_size=1, timeout=timeout)
    return device


def build_grid(tp: int = 1, pp: int = 1, cp: int = 1, device: torch.device | None = None,
               timeout_s: float = 600.0) -> ProcessGrid:
    """Split the initialised world into the TP x CP x DP x PP grid."""
    world = dist.get_world_size()
    dp = check_layout(world, tp, pp, cp)
    device = device or torch.device("cpu")
    mesh = init_device_mesh(device.type, (pp, dp, cp, tp), mesh_dim_names=MESH_DIMS)
    for dim in MESH_DIMS:
        set_group_timeout(mesh.get_group(dim), timeout_s)
    return ProcessGrid(mesh=mesh, tp=tp, pp=pp, dp=dp, cp=cp, device=device, timeout_s=timeout_s)


def set_group_timeout(group, timeout_s: float) -> None:
    """Subgroups get torch's default timeout (30 min for gloo, 10 for NCCL), not the world's;
    without this a rank that dies would leave its peers waiting in a TP/DP/PP collective far
    longer than parallel.timeout_s."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # no public setter for existing groups
    _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
