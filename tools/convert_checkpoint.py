"""Convert between Hugging Face checkpoints and Trellis checkpoints, tensor by tensor.

    python tools/convert_checkpoint.py hf-to-trellis --hf HF_DIR --out DIR [--tp N --pp N]
    python tools/convert_checkpoint.py trellis-to-hf --ckpt DIR --out HF_DIR [--family llama|mistral|qwen2|gpt2]
                                                     [--tokenizer-dir DIR] [--dtype float32|bfloat16|float16]

A Trellis checkpoint is layout-free, so the one written here loads at any TP/PP/DP
(`--checkpoint.load DIR` with `--config DIR/model.yaml`); --tp/--pp only check that the model
splits at that layout. Weights are read and written one tensor at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.checkpoint import (  # noqa: E402
    FORMAT, LATEST_FILE, META_FILE, CheckpointError, read_entries, read_meta, resolve_step_dir,
    step_dir_name, stored_shapes, write_atomically)
from models.config import ModelConfig, validate_model  # noqa: E402
from models.hf_mapping import (  # noqa: E402
    FAMILY_ARCHITECTURE, MappingError, infer_family, is_ignorable, model_fields_from_hf, hf_config_kwargs,
    tensor_maps)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """Bad input to the converter; one sentence."""


def progress(index: int, total: int, what: str) -> None:
    """A one-line progress bar on a terminal; only the final count when stderr is a log."""
    if index != total and not sys.stderr.isatty():
        return
    width = 30
    done = int(width * index / max(total, 1))
    print(f"\r[{'#' * done}{'.' * (width - done)}] {index}/{total} {what[:60]:<60}", end="", file=sys.stderr, flush=True)
    if index == total:
        print(file=sys.stderr, flush=True)


# ---- reading Hugging Face safetensors -----------------------------------------------------------
class HFWeights:
    """Lazy access to the tensors of a (sharded or single-file) safetensors checkpoint."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir, self._open, self._handles = hf_dir, safe_open, {}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as handle:
                self.file_of = json.load(handle)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            self.file_of = {name: "model.safetensors" for name in self._handle("model.safetensors").keys()}
        else:
            raise ConversionError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
        for file in sorted(set(self.file_of.values())):
            if not os.path.exists(os.path.join(hf_dir, file)):
                raise ConversionError(f"shard {file} listed in {hf_dir}/model.safetensors.index.json is missing")

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._open(os.path.join(self.hf_dir, file), framework="pt")
            except Exception as error:
                raise ConversionError(f"{self.hf_dir}/{file} is truncated or not a safetensors file ({error})") from None
        return self._handles[file]

    def names(self) -> list:
        return list(self.file_of)

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.file_of[name]).get_tensor(name)
        except Exception as error:
            raise ConversionError(f"could not read {name} from {self.hf_dir}/{self.file_of[name]}, "
                                  f"which is truncated or corrupt ({error})") from None


def to_trellis_blocks(tensor: torch.Tensor, tmap, padded_vocab: int) -> list:
    """An HF tensor as the Trellis tensors of its map (transposed, padded, split)."""
    tensor = tensor.to(torch.float32)
    if tmap.transpose:
        tensor = tensor.t()
    if tmap.vocab and tensor.shape[0] < padded_vocab:
        padding = tensor.new_zeros((padded_vocab - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    return [block.contiguous() for block in tensor.chunk(len(tmap.keys), 0)]


def check_hf_tensors(weights: HFWeights, maps: list, model: dict) -> None:
    """Every mapped tensor is present and nothing unmapped would be silently dropped."""
    names = set(weights.names())
    missing = [m.hf_name for m in maps if m.hf_name not in names]
    if missing:
        raise ConversionError(f"{weights.hf_dir} lacks {missing[0]} (and {len(missing) - 1} more) that the "
                              f"config.json's model needs")
    unknown = sorted(names - {m.hf_name for m in maps} - {n for n in names if is_ignorable(n, model)})
    if unknown:
        raise ConversionError(f"{weights.hf_dir} holds {unknown[0]} (and {len(unknown) - 1} more), which this "
                              f"model shape has no place for; config.json does not match the weights")


class LazySavePlanner:
    """A DCP save planner whose state dict holds meta tensors (shape and dtype only); each real
    tensor is produced when DCP writes it, so the whole model is never in memory at once."""

    def __new__(cls, produce):
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        class _Planner(DefaultSavePlanner):
            def lookup_object(self, index):
                return produce(index.fqn)

        return _Planner()


def hf_to_trellis(hf_dir: str, out: str, tp: int = 1, pp: int = 1) -> str:
    """Write a model-only Trellis checkpoint (step 0) of an HF checkpoint; returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    start = time.perf_counter()
    with open(os.path.join(hf_dir, "config.json")) as handle:
        hf_config = json.load(handle)
    family, fields = model_fields_from_hf(hf_config)
    model_cfg = ModelConfig(preset="tiny", **fields)
    validate_model(model_cfg, tp)
    if model_cfg.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide the model's {model_cfg.num_layers} layers")
    padded = model_cfg.padded_vocab_size(tp)
    model = dataclasses.asdict(model_cfg)
    weights = HFWeights(hf_dir)
    maps = tensor_maps(family, model)
    check_hf_tensors(weights, maps, model)

    key_source = {key: (tmap, index) for tmap in maps for index, key in enumerate(tmap.keys)}
    done = {"count": 0, "cache": {}}

    def produce(key):
        tmap, index = key_source[key]
        if tmap.hf_name not in done["cache"]:  # split HF tensors (GPT-2 c_attn) are read once
            done["cache"] = {tmap.hf_name: to_trellis_blocks(weights.get(tmap.hf_name), tmap, padded)}
        done["count"] += 1
        progress(done["count"], len(key_source), key)
        return done["cache"][tmap.hf_name][index]

    placeholders = {}
    for tmap in maps:
        shape = list(weights.shape(tmap.hf_name))
        if tmap.transpose:
            shape.reverse()
        if tmap.vocab:
            shape[0] = padded
        shape[0] //= len(tmap.keys)
        for key in tmap.keys:
            placeholders[key] = torch.empty(shape, dtype=torch.float32, device="meta")
    step_dir = os.path.join(out, step_dir_name(0))
    tmp = os.path.join(out, ".tmp_" + step_dir_name(0))
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save(placeholders, storage_writer=FileSystemWriter(tmp, thread_count=1), planner=LazySavePlanner(produce),
             no_dist=True)
    hf_dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    meta = {"format": FORMAT, "version": 1, "step": 0, "contents": ["model"], "layout": None,
            "padded_vocab": padded, "model": model, "hf_family": family, "hf_dtype": hf_dtype,
            "converted_from": os.path.abspath(hf_dir), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomically(os.path.join(tmp, META_FILE), json.dumps(meta, indent=1))
    shutil.rmtree(step_dir, ignore_errors=True)
    os.rename(tmp, step_dir)
    write_atomically(os.path.join(out, LATEST_FILE), step_dir_name(0) + "\n")
    with open(os.path.join(out, "model.yaml"), "w") as handle:
        yaml.safe_dump({"model": {k: v for k, v in model.items()}}, handle, sort_keys=False)
    print(f"wrote {step_dir} ({family}, {len(placeholders)} tensors) in {time.perf_counter() - start:.1f}s; "
          f"train from it with --config {out}/model.yaml --checkpoint.load {out}", file=sys.stderr)
    return step_dir


# ---- writing Hugging Face safetensors -----------------------------------------------------------
def read_trellis_tensor(step_dir: str, key: str, shape: tuple) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.float32)
    read_entries(step_dir, {key: (tensor, [tensor])}, no_dist=True)
    return tensor


def to_hf_tensor(blocks: list, tmap, vocab_size: int, dtype) -> torch.Tensor:
    tensor = torch.cat(blocks, 0) if len(blocks) > 1 else blocks[0]
    if tmap.vocab:
        tensor = tensor[:vocab_size]
    if tmap.transpose:
        tensor = tensor.t()
    return tensor.to(dtype).contiguous()


class ShardWriter:
    """Accumulates tensors into safetensors files of at most `max_bytes` each, then names them
    model-0000i-of-0000n.safetensors with an index (or model.safetensors when one suffices)."""

    def __init__(self, out: str, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending, self.pending_bytes, self.files, self.weight_map = {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name], self.pending_bytes = tensor, self.pending_bytes + size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = os.path.join(self.out, f".part{len(self.files)}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], os.path.join(self.out, "model.safetensors"))
            return
        total, weight_map = 0, {}
        for number, (path, names, size) in enumerate(self.files, start=1):
            final = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(path, os.path.join(self.out, final))
            weight_map.update({name: final for name in names})
            total += size
        with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)


def write_hf_config(out: str, family: str, model: dict, dtype: str) -> None:
    import transformers

    config_class = transformers.AutoConfig.for_model(family).__class__
    config = config_class(architectures=[FAMILY_ARCHITECTURE[family]], **hf_config_kwargs(family, model))
    config.dtype = dtype
    config.save_pretrained(out)


def trellis_to_hf(ckpt: str, out: str, family: str = "", tokenizer_dir: str = "", dtype: str = "",
                  max_shard_bytes: int = 5 << 30) -> None:
    start = time.perf_counter()
    step_dir = resolve_step_dir(ckpt, -1)
    meta = read_meta(step_dir)
    model = meta["model"]
    family = family or meta.get("hf_family") or infer_family(model)
    if family not in FAMILY_ARCHITECTURE:
        raise ConversionError(f"--family must be one of {', '.join(sorted(FAMILY_ARCHITECTURE))}; got {family!r}")
    dtype = dtype or meta.get("hf_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if meta.get("trainable_only"):
        raise ConversionError(f"{step_dir} holds only LoRA adapters; convert the base model, or merge the adapters "
                              "into it first (tools/merge_lora.py), or export them with tools/export_peft.py")
    shapes = stored_shapes(step_dir)
    maps = tensor_maps(family, model)
    missing = [key for tmap in maps for key in tmap.keys if key not in shapes]
    if missing:
        raise ConversionError(f"{step_dir} lacks {missing[0]}; it is not a {family} model of its recorded shape")
    os.makedirs(out, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    for index, tmap in enumerate(maps, start=1):
        blocks = [read_trellis_tensor(step_dir, key, shapes[key]) for key in tmap.keys]
        writer.add(tmap.hf_name, to_hf_tensor(blocks, tmap, model["vocab_size"], DTYPES[dtype]))
        progress(index, len(maps), tmap.hf_name)
    writer.finish()
    write_hf_config(out, family, model, dtype)
    copied = [f for f in TOKENIZER_FILES if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, f))]
    for name in copied:
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    print(f"wrote {family} model to {out} ({len(maps)} tensors, {dtype}, tokenizer files: {copied or 'none'}) "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)


# ---- command line -------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_trellis = commands.add_parser("hf-to-trellis")
    to_trellis.add_argument("--hf", required=True)
    to_trellis.add_argument("--out", required=True)
    to_trellis.add_argument("--tp", type=int, default=1)
    to_trellis.add_argument("--pp", type=int, default=1)
    to_hf = commands.add_parser("trellis-to-hf")
    to_hf.add_argument("--ckpt", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--family", default="", choices=["", *sorted(FAMILY_ARCHITECTURE)])
    to_hf.add_argument("--tokenizer-dir", default="")
    to_hf.add_argument("--dtype", default="", choices=["", *DTYPES])
    to_hf.add_argument("--max-shard-mb", type=float, default=5120.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # The converter is one process by design; DCP warns about that on every call.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        if args.command == "hf-to-trellis":
            if not os.path.exists(os.path.join(args.hf, "config.json")):
                raise ConversionError(f"{args.hf} has no config.json")
            hf_to_trellis(args.hf, args.out, args.tp, args.pp)
        else:
            trellis_to_hf(args.ckpt, args.out, args.family, args.tokenizer_dir, args.dtype,
                          int(args.max_shard_mb * (1 << 20)))
    except (ConversionError, MappingError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
