"""Run a function on N real processes (gloo on CPU) and collect each rank's return value."""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, result_dir, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
    except BaseException:
        result = RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}")
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as handle:
        pickle.dump(result, handle)
    if isinstance(result, BaseException):
        os._exit(1)  # peers may be blocked in a collective; do not wait for them


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(*args) on `world_size` spawned ranks; returns their results in rank order."""
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(_worker, args=(world_size, free_port(), result_dir, fn, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        try:
            while not context.join(timeout=300):
                pass
        except Exception:
            pass
        results = []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    results.append(pickle.load(handle))
            else:
                results.append(RuntimeError(f"rank {rank} produced no result"))
    failures = [r for r in results if isinstance(r, BaseException)]
    failures.sort(key=lambda r: "produced no result" in str(r))  # the real error first
    if failures:
        raise failures[0]
    return results
