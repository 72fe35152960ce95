"""Generate completions from a Trellis checkpoint (any saved layout) with a KV cache.

    python tools/generate.py --ckpt RUN_DIR --tokenizer data/tok.model --prompt "def add(a, b):"
    torchrun --nproc-per-node 2 tools/generate.py --ckpt RUN_DIR --tokenizer data/tok.model \\
        --prompts-file prompts.txt --tp 2 --temperature 0.8 --top-p 0.95

Prompts come from --prompt (repeatable) or --prompts-file (one prompt per line; a .jsonl file
gives each record's "prompt"). They are generated as one left-padded batch, greedy by default
(--temperature > 0 samples, seeded by --seed), stopping at the tokenizer's end-of-document
token or after --max-new-tokens. The world size must be --tp x --pp. On one GPU each decode step
after the prompt replays a CUDA graph (--decode eager turns that off). Each completion is
printed after its prompt, separated by a line of dashes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint root (or one step's directory)")
    p.add_argument("--step", type=int, default=-1, help="step to load (default: the latest)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file, or HF tokenizer.json / its folder")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default="sentencepiece")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; may be repeated")
    p.add_argument("--prompts-file", default="", help="one prompt per line, or JSONL records with a 'prompt' field")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", action="store_true", help="start every prompt with the end-of-document token, "
                   "as documents follow one another in pretraining data")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--decode", choices=["auto", "eager"], default="auto",
                   help="auto: decode steps replay a CUDA graph where they can (one GPU, no FP8); eager: never")
    return p.parse_args(argv)


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise SystemExit(f"error: --prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
        prompts += [json.loads(line)["prompt"] for line in lines] if args.prompts_file.endswith(".jsonl") else lines
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    return prompts


def generate(args) -> list:
    """(prompt, completion) pairs; collective over the tp x pp ranks."""
    import torch

    from engine.data.tokenizer import build_tokenizer
    from engine.generation import TextGenerator
    from engine.inference import build_chunks, checkpoint_model_config, load_model_weights
    from engine.launch import UserError
    from models.config import validate_model
    from parallel.grid import build_grid, check_layout, init_distributed
    from parallel.random import RNGTracker
    from parallel.vocab_sampling import SamplingParams

    world = int(os.environ.get("WORLD_SIZE", 1))
    if check_layout(world, args.tp, args.pp) != 1:
        raise UserError(f"--tp x --pp = {args.tp} x {args.pp} must equal the world size {world}")
    model_cfg = checkpoint_model_config(args.ckpt, args.step)
    validate_model(model_cfg, args.tp)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"--tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = init_distributed(device_type)
    grid = build_grid(args.tp, args.pp, device=device)
    rng = RNGTracker(device)
    rng.seed(args.seed, grid.tp_rank, grid.pp_rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunks = build_chunks(model_cfg, grid, rng, device, dtype, seed=0)
    load_model_weights(chunks, grid, args.ckpt, model_cfg, args.step)
    prompts = read_prompts(args)
    prefix = [tokenizer.eod_id] if args.bos else []
    ids = [prefix + tokenizer.encode(p) for p in prompts]
    if min(len(i) for i in ids) == 0:
        raise UserError("a prompt is empty after tokenization; give some text or use --bos")
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    try:
        params.validate()
    except ValueError as error:
        raise UserError(str(error)) from None
    result = TextGenerator(chunks, grid, device, decode=args.decode).generate(
        ids, args.max_new_tokens, params, eos_id=tokenizer.eod_id, pad_id=tokenizer.pad_id, seed=args.seed,
        vocab_limit=tokenizer.vocab_size)
    completions = [tokenizer.decode([t for t in row if t != tokenizer.eod_id]) for row in result.response_lists()]
    return list(zip(prompts, completions))


def main(argv=None) -> int:
    from engine.data.errors import DataError
    from engine.launch import UserError, report_user_error

    args = parse_args(argv)
    try:
        pairs = generate(args)
    except (UserError, DataError) as error:
        return report_user_error(error)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for prompt, completion in pairs:
            print(f"{prompt}{completion}\n" + "-" * 40, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
