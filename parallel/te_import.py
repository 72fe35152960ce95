"""Importing Transformer Engine, where it is installed, for its FP8 linears
(parallel/te_fp8.py) and its attention (models/te_attention.py): once per process, with the
reason when it cannot be imported, and with torch's own cuDNN in place first (see
`_load_torchs_cudnn`)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.util
import os
import sys
from typing import Optional

import torch


def _load_torchs_cudnn() -> Optional[str]:
    """Load every library of torch's own cuDNN (globally) before TE imports. TE's loader takes a
    system cuDNN where it finds one, and its core library links cuDNN's sub-libraries by name. A
    system cuDNN of another version then either wins the names torch loads later (torch refuses
    it: "cuDNN version incompatibility") or fills only some of them and fails to link against
    torch's copy (undefined symbols), as on the H200 machines here (system 9.14, torch 9.19).
    Returns their folder, for TE's loader (None where torch has no cuDNN loaded)."""
    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available() or not os.path.exists("/proc/self/maps"):
        return None
    torch.backends.cudnn.version()  # loads it
    with open("/proc/self/maps") as maps:
        path = next((line.split()[-1] for line in maps if "/libcudnn.so" in line), None)
    if path is None:
        return None
    folder = os.path.dirname(path)
    for library in sorted(glob.glob(os.path.join(folder, "libcudnn*.so*"))):
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # a sub-library this machine cannot load; cuDNN loads the ones it needs itself
    return folder


@contextlib.contextmanager
def _cudnn_home(folder: Optional[str]):
    """CUDNN_HOME (where TE's loader looks first) set to `folder` while TE imports, and only then.
    torch's extension builder reads the variable too, once, as it is first imported, and adds its
    paths to every build command: left set, it changed the commands of Trellis's cached kernels,
    so each process that imported TE rebuilt them all (minutes), and the next one without TE
    rebuilt them back. The builder is imported before the variable is set."""
    import torch.utils.cpp_extension  # noqa: F401  (reads CUDNN_HOME now, unset)

    if folder is None or "CUDNN_HOME" in os.environ:
        yield
        return
    os.environ["CUDNN_HOME"] = folder
    try:
        yield
    finally:
        del os.environ["CUDNN_HOME"]


@functools.lru_cache(maxsize=None)
def import_te() -> tuple:
    """((transformer_engine.pytorch, transformer_engine.common.recipe) or None, why not)."""
    if "transformer_engine" not in sys.modules and importlib.util.find_spec("transformer_engine") is None:
        return None, "not installed"  # (and torch's cuDNN is left to load as it would)
    try:
        with _cudnn_home(_load_torchs_cudnn()):
            import transformer_engine.pytorch as te
            from transformer_engine.common import recipe
    except Exception as error:  # ImportError, or its CUDA libraries failing to load as it imports
        return None, f"{type(error).__name__}: {error}"
    return (te, recipe), ""
