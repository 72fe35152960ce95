"""Saving and resuming a run on `torch.distributed.checkpoint` (DCP), at any layout.

On disk:

    DIR/latest                  the newest complete step ("step_000100"), replaced atomically
    DIR/step_000100/.metadata   DCP's index of every stored tensor (global keys, full shapes)
    DIR/step_000100/*.distcp    tensor data, written by whichever ranks hold it (one copy)
    DIR/step_000100/trellis.json  step, LR schedule, loss scaler, layout, model and run config

Tensors use the global keys of `engine.checkpoint_state`, so a checkpoint saved at one
TP/PP/DP layout loads at another. A save goes to DIR/.tmp_step_000100 and is renamed only
after every rank has finished writing, so a crash mid-save leaves the previous checkpoint
(and `latest`) untouched; with `checkpoint.async_save` that write runs in the background
(engine/background_save.py). Nothing here unpickles arbitrary objects: DCP's index is read with
an allow-list of its own classes, tensor data with `weights_only=True`, the rest is JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from engine import background_save
from engine.checkpoint_state import model_entries, optimizer_entries, optimizer_load_targets
from engine.config import ADAPTER_METHODS
from engine.launch import UserError
from parallel.fp8_state import amax_histories, amax_history_length, load_amax_histories

META_FILE = "trellis.json"
LATEST_FILE = "latest"
FORMAT = "trellis-checkpoint"
# Test hook: exit the process between writing a checkpoint and publishing it (crash tests).
CRASH_ENV = "TRELLIS_CHECKPOINT_CRASH_BEFORE_RENAME"
AMAX_KIND = "fp8_amax"  # keys of the FP8 amax histories: fp8_amax.<grid place>.c<chunk>.<layer>.<x|w|g>
# Model fields that change what the weights mean; training-only fields may differ on load.
NOT_ARCHITECTURE = {"preset", "seq_length", "dropout", "attention_dropout", "init_std", "recompute",
                    "attention_backend", "make_vocab_size_divisible_by"}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one sentence naming it."""


# ---- paths ----------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def saved_steps(root: str) -> list:
    """Steps of complete checkpoints under `root`, oldest first."""
    steps = []
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        if entry.startswith("step_") and entry[5:].isdigit() and os.path.isdir(os.path.join(root, entry)):
            steps.append(int(entry[5:]))
    return sorted(steps)


def resolve_step_dir(root: str, step: int) -> str:
    """The directory of checkpoint `step`, or of the latest one when step is 0 or negative."""
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if step > 0:
        path = os.path.join(root, step_dir_name(step))
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} does not exist; saved steps are {saved_steps(root) or 'none'}")
        return path
    if os.path.exists(os.path.join(root, META_FILE)):
        return root  # DIR is itself one step's checkpoint
    latest = os.path.join(root, LATEST_FILE)
    if not os.path.exists(latest):
        raise CheckpointError(f"{root} holds no checkpoint (no {LATEST_FILE} file and no {META_FILE})")
    with open(latest) as handle:
        path = os.path.join(root, handle.read().strip())
    if not os.path.isdir(path):
        raise CheckpointError(f"{latest} names {path}, which does not exist")
    return path


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_meta(step_dir: str) -> dict:
    path = os.path.join(step_dir, META_FILE)
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is not a Trellis checkpoint ({META_FILE} is missing)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is truncated or corrupt (not valid JSON)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Trellis checkpoint description")
    return meta


# ---- reading DCP's index without unpickling arbitrary code -----------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its index; allow only the classes that index is made of."""

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
                ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint index refers to {module}.{name}, which a checkpoint never holds")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} has no tensor index (.metadata); the save did not finish") from None
        except (EOFError, pickle.UnpicklingError):
            raise CheckpointError(f"{path} is truncated or corrupt") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


def stored_shapes(step_dir: str) -> dict:
    """{key: full shape} of every tensor in a checkpoint."""
    metadata = SafeReader(step_dir).read_metadata()
    return {key: tuple(getattr(item, "size", ())) for key, item in metadata.state_dict_metadata.items()}


def check_keys(step_dir: str, entries: dict, shapes: dict) -> None:
    """Fail with one sentence before DCP does with a page: a missing key or a wrong shape."""
    missing = [key for key in entries if key not in shapes]
    if missing and all(".lora_" in key for key in missing):
        raise CheckpointError(f"checkpoint {step_dir} holds no LoRA adapters (it is a model): to fine-tune it with "
                              f"adapters give it as --finetune.base {step_dir}")
    if missing:
        raise CheckpointError(f"checkpoint {step_dir} lacks {len(missing)} tensor(s) this model needs, "
                              f"e.g. {missing[0]}; it was saved for another model")
    for key, (stored, _) in entries.items():
        if tuple(stored.shape) != shapes[key]:
            raise CheckpointError(f"checkpoint {step_dir} stores {key} with shape {list(shapes[key])} "
                                  f"but this model needs {list(stored.shape)}; it was saved for another model shape")


def read_entries(step_dir: str, entries: dict, no_dist: bool = False) -> None:
    """Load DCP tensors into `entries` (each rank reads only the slices it holds)."""
    try:
        dcp.load({key: stored for key, (stored, _) in entries.items()}, storage_reader=SafeReader(step_dir),
                 no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # DCP wraps per-rank errors (a BaseException)
        detail = str(error).strip().splitlines()
        cause = detail[-1] if detail else type(error).__name__
        raise CheckpointError(f"could not read checkpoint {step_dir}: a data file is missing or truncated ({cause})") from None
    with torch.no_grad():
        for stored, views in entries.values():
            local = stored.to_local() if isinstance(stored, DTensor) else stored
            for view in views:
                if view.data_ptr() != local.data_ptr():
                    view.copy_(local)


# ---- what a run saves -------------------------------------------------------------------------------
def architecture(model_cfg) -> dict:
    fields = model_cfg if isinstance(model_cfg, dict) else dataclasses.asdict(model_cfg)
    return {k: v for k, v in fields.items() if k not in NOT_ARCHITECTURE}


def check_same_model(step_dir: str, meta: dict, model_cfg, tp: int) -> None:
    saved, current = architecture(meta["model"]), architecture(model_cfg)
    differences = [f"{k} {saved.get(k)!r} (checkpoint) vs {v!r} (this run)" for k, v in current.items() if saved.get(k) != v]
    if differences:
        raise CheckpointError(f"checkpoint {step_dir} holds a different model: {'; '.join(differences)}")
    padded = model_cfg.padded_vocab_size(tp)
    if meta.get("padded_vocab", padded) != padded:
        raise CheckpointError(f"checkpoint {step_dir} pads the vocabulary to {meta['padded_vocab']} rows but "
                              f"parallel.tp={tp} pads it to {padded}; use a TP size that divides {meta['padded_vocab']}")


def layout_of(grid) -> dict:
    return {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp, "cp": grid.cp, "world_size": grid.world_size}


def grid_prefix(kind: str, grid) -> str:
    """Key prefix of one rank's own state (its generators, its FP8 amax histories): its grid place."""
    return f"{kind}.pp{grid.pp_rank}.tp{grid.tp_rank}.cp{grid.local_rank('cp')}.dp{grid.dp_rank}."


def rng_prefix(grid) -> str:
    return grid_prefix("rng", grid)


def stored_zeros(shapes: dict, prefix: str, dtype=None) -> dict:
    """Entries to read a checkpoint's tensors under `prefix` into: zeros of their stored shapes."""
    return {key: (zeros, [zeros]) for key, shape in shapes.items() if key.startswith(prefix)
            for zeros in [torch.zeros(shape, dtype=dtype)]}


def rng_entries(trainer) -> dict:
    """This rank's generator states under a key of its own grid coordinates."""
    states = {"cpu": torch.get_rng_state(), **trainer.rng.get_states()}
    return {rng_prefix(trainer.grid) + name: (state, [state]) for name, state in states.items() if state is not None}


def amax_entries(trainer) -> dict:
    """This rank's FP8 amax histories (`train.fp8_amax_history` above 1), per model chunk: each
    rank scales its own activations and gradients, so each keeps its own."""
    prefix = grid_prefix(AMAX_KIND, trainer.grid)
    return {f"{prefix}c{index}.{name}": (past, [past]) for index, chunk in enumerate(trainer.model_chunks)
            for name, past in amax_histories(chunk).items()}


def amax_load_entries(trainer, meta: dict, shapes: dict) -> dict:
    """Zeros to read this rank's saved amax histories into, where they fit: a checkpoint of the
    same layout whose histories have this run's length. Otherwise none (said once where this run
    keeps histories): each history then restarts from its next amax. Decided from what every
    rank sees alike, so all ranks read together."""
    length = max(amax_history_length(chunk) for chunk in trainer.model_chunks)
    if length <= 1:
        return {}
    saved = {key: shape for key, shape in shapes.items() if key.startswith(AMAX_KIND + ".")}
    saved_vpp = meta.get("config", {}).get("parallel", {}).get("vpp")
    same_place = meta["layout"] == layout_of(trainer.grid) and saved_vpp == trainer.cfg.parallel.vpp  # chunk = place
    if same_place and saved and all(shape == (length,) for shape in saved.values()):
        return stored_zeros(saved, grid_prefix(AMAX_KIND, trainer.grid))
    if meta["step"] > 0:
        why = (f"it was saved at layout {meta['layout']}, parallel.vpp {saved_vpp}" if not same_place else
               "it holds none of this length (another train.fp8_amax_history, or saved without histories)")
        announce(trainer, f"checkpoint: FP8 amax histories not restored ({why}); each restarts from its next amax, "
                          "so the first steps scale differently from the original run")
    return {}


def restore_amax_histories(trainer, entries: dict) -> None:
    prefix = grid_prefix(AMAX_KIND, trainer.grid)
    for index, chunk in enumerate(trainer.model_chunks):
        chunk_prefix = f"{prefix}c{index}."
        load_amax_histories(chunk, {key[len(chunk_prefix):]: saved for key, (saved, _) in entries.items()
                                    if key.startswith(chunk_prefix)})


def jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in {META_FILE}")


def trainable_only(trainer) -> bool:
    """LoRA/QLoRA checkpoints keep only what trains (the adapters): the frozen base comes from
    finetune.base (or, without one, from the seeded initialisation) on every load."""
    return trainer.cfg.finetune.method in ADAPTER_METHODS


def run_meta(trainer, contents: list) -> dict:
    scaler = getattr(trainer.optimizer, "scaler", None)
    return {
        "format": FORMAT, "version": 1, "step": trainer.step, "contents": contents,
        "trainable_only": trainable_only(trainer), "consumed_samples": trainer.consumed_samples,
        "layout": layout_of(trainer.grid), "padded_vocab": trainer.model_chunks[0].padded_vocab,
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "optimizer_steps": getattr(trainer.optimizer, "steps_taken", 0),
        "model": dataclasses.asdict(trainer.cfg.model), "config": dataclasses.asdict(trainer.cfg),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def per_parameter(param_state: dict) -> dict:
    """The optimizer's per-parameter tensors; its `__name__` scalars go to the metadata."""
    return {name: state for name, state in param_state.items() if not name.startswith("__")}


def training_entries(trainer) -> dict:
    tp_mesh = trainer.grid.mesh["tp"]
    entries = model_entries(trainer.model_chunks, tp_mesh, for_load=False, trainable_only=trainable_only(trainer))
    entries.update(optimizer_entries(trainer.model_chunks, tp_mesh, per_parameter(trainer.optimizer.param_state_by_name()),
                                     for_load=False))
    entries.update(rng_entries(trainer))
    entries.update(rank_local_entries(trainer))
    entries.update(amax_entries(trainer))
    return entries


def rank_local_prefix(grid) -> str:
    """Optimizer state tied to one TP shard (GaLore's projections) is keyed by the TP place, so
    it is restored only at the same TP size (DP replicas share a key and one copy is written)."""
    return f"optim_local.tp{grid.tp_rank}of{grid.tp}."


def rank_local_entries(trainer, shapes: dict | None = None) -> dict:
    """Entries of this rank's rank-local optimizer state: the live tensors to save, or (given
    the checkpoint's `shapes`) zeros for the ones the checkpoint holds, to load."""
    prefix = rank_local_prefix(trainer.grid)
    if shapes is not None:
        return stored_zeros(shapes, prefix)
    return {prefix + key: (tensor, [tensor]) for key, tensor in trainer.optimizer.rank_local_state().items()}


def restore_rank_local(trainer, entries: dict) -> None:
    prefix = len(rank_local_prefix(trainer.grid))
    restored = trainer.optimizer.load_rank_local_state({key[prefix:]: t for key, (t, _) in entries.items()})
    if trainer.optimizer.has_rank_local_state() and trainer.optimizer.steps_taken and not restored:
        announce(trainer, "checkpoint: no GaLore projections for this tensor-parallel place (saved at another TP "
                          "size, or by another optimizer); they restart (new bases, zero moments) at the next step")


# ---- save ---------------------------------------------------------------------------------------------
def announce(trainer, message: str) -> None:
    if dist.get_rank() == 0 and not trainer.cfg.log.quiet:
        print(message, file=sys.stderr, flush=True)


def save_due(ckpt_cfg, step: int, final: bool) -> bool:
    if not ckpt_cfg.save:
        return False
    return final or bool(ckpt_cfg.interval and step % ckpt_cfg.interval == 0)


def publish(root: str, tmp: str, step_dir: str) -> None:
    """Make a finished temporary directory the checkpoint of its step, then point `latest` at
    it. A checkpoint of the same step already there is replaced only once the new one is in."""
    old = None
    if os.path.exists(step_dir):
        old = f"{tmp}.replaced"
        os.rename(step_dir, old)
    os.rename(tmp, step_dir)
    write_atomically(os.path.join(root, LATEST_FILE), os.path.basename(step_dir) + "\n")
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    steps = saved_steps(root)
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, step_dir_name(step)), ignore_errors=True)


def remove_stale_temporaries(root: str) -> None:
    """Leftovers of saves that crashed; never loadable, so safe to delete."""
    for entry in os.listdir(root):
        if entry.startswith(".tmp_step_"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def save_checkpoint(trainer, root: str, keep: int = 0, background: bool = False) -> str:
    """Write the whole training state of every rank to root/step_XXXXXX; collective. With
    `background`, the state is copied to host memory and written by a thread while training
    goes on (engine/background_save.py); a save still in flight is waited for first."""
    background_save.wait_for_pending()
    start = time.perf_counter()
    step = trainer.step
    step_dir = os.path.join(root, step_dir_name(step))
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        remove_stale_temporaries(root)
    dist.barrier()
    state = {key: stored for key, (stored, _) in training_entries(trainer).items()}
    meta = json.dumps(run_meta(trainer, ["model", "optimizer", "rng", "trainer"]), indent=1, default=jsonable)
    if not background:
        write_checkpoint(state, meta, root, step, keep)
        dist.barrier()
        announce(trainer, f"checkpoint: saved step {step} to {step_dir} in {time.perf_counter() - start:.2f}s")
        return step_dir
    staged = background_save.stage_on_host(state)
    group = background_save.save_group()
    quiet = trainer.cfg.log.quiet

    def write() -> None:
        written = time.perf_counter()
        write_checkpoint(staged, meta, root, step, keep, group)
        if dist.get_rank() == 0 and not quiet:
            print(f"checkpoint: saved step {step} to {step_dir} in the background "
                  f"({time.perf_counter() - written:.2f}s)", file=sys.stderr, flush=True)

    background_save.start(write, f"step {step} to {step_dir}")
    announce(trainer, f"checkpoint: step {step} copied to host memory in {time.perf_counter() - start:.2f}s; "
                      "writing it in the background")
    return step_dir


def write_checkpoint(state: dict, meta: str, root: str, step: int, keep: int, group=None) -> None:
    """Every rank writes its share of `state` into the step's temporary directory; once all have,
    rank 0 publishes it and prunes old steps. `group` coordinates the ranks (None: the world)."""
    tmp = os.path.join(root, ".tmp_" + step_dir_name(step))
    is_writer = dist.get_rank() == 0
    dcp.save(state, storage_writer=FileSystemWriter(tmp), process_group=group)
    if is_writer:
        write_atomically(os.path.join(tmp, META_FILE), meta)
    dist.barrier(group=group)  # every rank's data is on disk before the checkpoint becomes visible
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(17)
    if is_writer:
        publish(root, tmp, os.path.join(root, step_dir_name(step)))
        prune(root, keep)


# ---- load ---------------------------------------------------------------------------------------------
def restore_rng(trainer, meta: dict, shapes: dict) -> None:
    """The saved generator states when this rank existed at the same layout; otherwise a
    deterministic re-seed from (seed, step), since per-rank streams do not map across layouts."""
    grid = trainer.grid
    if "rng" in meta["contents"] and meta["layout"] == layout_of(grid):
        prefix = rng_prefix(grid)
        entries = stored_zeros(shapes, prefix, torch.uint8)
        read_entries(meta["_dir"], entries)
        states = {key[len(prefix):]: state for key, (state, _) in entries.items()}
        trainer.rng.set_states({"default": states["default"], "tp": states.get("tp")})
        torch.set_rng_state(states["cpu"])
        return
    trainer.rng.seed(trainer.cfg.train.seed + meta["step"], grid.tp_rank, grid.pp_rank)
    if "rng" in meta["contents"]:
        announce(trainer, f"checkpoint: layout changed ({meta['layout']} -> {layout_of(grid)}); random "
                          f"generators re-seeded from train.seed + step, so dropout masks differ from the original run")


def check_same_base(step_dir: str, meta: dict, base: str) -> None:
    """An adapters-only checkpoint resumes on the base it was trained on: a missing or extra
    finetune.base would silently put the adapters on other weights."""
    if not meta.get("trainable_only"):
        return
    saved_base = meta.get("config", {}).get("finetune", {}).get("base", "")
    if saved_base and not base:
        raise CheckpointError(f"checkpoint {step_dir} holds only adapters, trained on the base {saved_base}; "
                              f"resume with --finetune.base {saved_base}")
    if base and not saved_base:
        raise CheckpointError(f"checkpoint {step_dir} holds adapters trained on the seeded random base (its run had "
                              "no finetune.base); resume without --finetune.base")


def check_same_optimizer(step_dir: str, meta: dict, name: str) -> None:
    """Optimizer state resumes only into the optimizer that wrote it (GaLore's projected moments
    or Lion's single moment do not fit AdamW)."""
    saved = meta.get("config", {}).get("optim", {}).get("name")
    if "optimizer" in meta["contents"] and saved and saved != name:
        raise CheckpointError(f"checkpoint {step_dir} holds {saved} optimizer state, but this run uses optim.name {name}: "
                              f"resume with --optim.name {saved}, or start {name} from these weights with "
                              "--checkpoint.load_model_only true")


def load_pretrained(trainer, root: str) -> None:
    """finetune.base: the pretrained weights a fine-tune starts from, read before adapters or
    NF4 bases exist (so every parameter of the model is a base weight)."""
    meta = read_meta(resolve_step_dir(root, -1))
    if meta.get("trainable_only"):
        raise CheckpointError(f"finetune.base {root} holds only the adapters of a fine-tune, not a model; give the "
                              "pretrained model (or merge the adapters into it with tools/merge_lora.py)")
    load_checkpoint(trainer, root, model_only=True)


def load_checkpoint(trainer, root: str, step: int = -1, model_only: bool = False) -> int:
    """Restore model (and, when saved and not model_only, optimizer, schedule, scaler, RNG and
    step) at this rank's layout; collective. Returns the step to continue from. model_only
    starts a fine-tune from pretrained weights: step 0, fresh optimizer and schedule."""
    start = time.perf_counter()
    step_dir = resolve_step_dir(root, step)
    meta = read_meta(step_dir)
    meta["_dir"] = step_dir
    check_same_model(step_dir, meta, trainer.cfg.model, trainer.grid.tp)
    if not model_only:
        check_same_base(step_dir, meta, trainer.cfg.finetune.base)
        check_same_optimizer(step_dir, meta, trainer.cfg.optim.name)
    shapes = stored_shapes(step_dir)
    chunks, tp_mesh = trainer.model_chunks, trainer.grid.mesh["tp"]
    entries = model_entries(chunks, tp_mesh, for_load=True, trainable_only=trainable_only(trainer) and not model_only)
    optim_targets = optimizer_load_targets(chunks, shapes) if "optimizer" in meta["contents"] and not model_only else {}
    entries.update(optimizer_entries(chunks, tp_mesh, optim_targets, for_load=True))
    check_keys(step_dir, entries, shapes)
    local = rank_local_entries(trainer, shapes) if "optimizer" in meta["contents"] and not model_only else {}
    amax = amax_load_entries(trainer, meta, shapes) if not model_only else {}
    read_entries(step_dir, {**entries, **local, **amax})
    restore_amax_histories(trainer, amax)
    if optim_targets:
        trainer.optimizer.load_param_state_by_name({**optim_targets, "__step__": meta.get("optimizer_steps", 0)})
    if local or (optim_targets and trainer.optimizer.has_rank_local_state()):
        restore_rank_local(trainer, local)
    if model_only:
        announce(trainer, f"checkpoint: loaded the weights of {step_dir} (model only) in {time.perf_counter() - start:.2f}s")
        return 0  # a fine-tune starts at step 0
    if "trainer" in meta["contents"]:
        trainer.scheduler.load_state_dict(meta["scheduler"])
        scaler = getattr(trainer.optimizer, "scaler", None)
        if scaler is not None and meta.get("scaler") is not None:
            scaler.load_state_dict(meta["scaler"])
        trainer.step = int(meta["step"])
        trainer.consumed_samples = int(meta.get("consumed_samples", trainer.step * trainer.cfg.train.global_batch_size))
    restore_rng(trainer, meta, shapes)
    announce(trainer, f"checkpoint: loaded {step_dir} ({', '.join(meta['contents'])}; saved at layout "
                      f"{meta['layout']}) in {time.perf_counter() - start:.2f}s")
    return trainer.step
