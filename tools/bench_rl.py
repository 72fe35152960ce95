"""PPO throughput: rollout generation tokens/s and training tokens/s on one device.

    python tools/bench_rl.py                                   # llama-1.3b, bf16, CUDA
    python tools/bench_rl.py --cuda-graphs                     # training passes from layer graphs
    python tools/bench_rl.py --preset tiny --device cpu --prompts 4 --prompt-len 12 --new-tokens 4

Builds the real PPO trainer (policy with a value head on its trunk, frozen reference, rule
reward on arithmetic prompts) from random weights and times whole iterations after one
warm-up: the KV-cache generation of --new-tokens per prompt (responses run to full length:
the stop token is disabled, so every iteration generates the same number of tokens), the
scoring forwards (policy log-probs and values, reference log-probs), and --epochs optimisation
passes over the rollout in one minibatch of micro-batches of --micro-batch sequences. Prompts
are left-padded to --prompt-len, so every sequence is prompt-len + new-tokens long. Prints one
JSON line per timed iteration and a summary; the defaults take well under 3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1.3b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--precision", default="auto", help="train.precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--prompts", type=int, default=64, help="sequences per rollout")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--attention-backend", default="sdpa", help="model.attention_backend for the scoring and "
                   "training forwards (generation always uses SDPA with the cache's mask)")
    p.add_argument("--decode", choices=["auto", "eager"], default="auto", help="rl.decode: CUDA-graph decode steps "
                   "where they apply, or eager ones")
    p.add_argument("--cuda-graphs", action="store_true", help="model.cuda_graphs: the training forwards and "
                   "backwards replay each layer from a CUDA graph (needs --attention-backend sdpa)")
    return p.parse_args(argv)


def build_trainer(args, folder: str):
    from engine.config import Config, apply_mapping, validate
    from engine.rl.arithmetic_data import write_char_tokenizer
    from engine.rl.policy_trainer import PPOTrainer

    cfg = Config()
    apply_mapping(cfg, {
        "model": {"preset": args.preset, "seq_length": args.prompt_len + args.new_tokens,
                  "attention_backend": args.attention_backend, "cuda_graphs": args.cuda_graphs},
        "train": {"objective": "ppo", "iters": args.iters + 1, "micro_batch_size": args.micro_batch,
                  "global_batch_size": args.prompts, "precision": args.precision, "device": args.device,
                  "lr": 1e-6, "output_dir": os.path.join(folder, "run")},
        "data": {"tokenizer": write_char_tokenizer(os.path.join(folder, "tok")), "tokenizer_type": "hf"},
        "rl": {"prompts_per_iter": args.prompts, "max_new_tokens": args.new_tokens, "epochs": args.epochs,
               "temperature": 1.0, "decode": args.decode},
        "log": {"quiet": True},
    })
    trainer = PPOTrainer(validate(cfg, int(os.environ.get("WORLD_SIZE", 1))))
    trainer.stop_id = None  # full-length responses: the same work every iteration
    return trainer


def timed_generation(trainer, clock):
    """Wrap the trainer's generator so each call's wall time is recorded."""
    generate, times = trainer.generator.generate, []

    def wrapped(*a, **k):
        start = clock()
        result = generate(*a, **k)
        times.append(clock() - start)
        return result

    trainer.generator.generate = wrapped
    return times


def run(args) -> dict:
    import torch

    from engine.metrics import peak_memory_gib
    from engine.precision import resolve_precision

    def clock():
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(args, folder)
        generation_times = timed_generation(trainer, clock)
        rows = []
        for iteration in range(args.iters + 1):
            start = clock()
            rollout = trainer.collect_rollout()
            collected = clock()
            trainer.optimise(rollout)
            done = clock()
            trainer.step += 1
            generated = args.prompts * args.new_tokens
            trained = args.epochs * args.prompts * (args.prompt_len + args.new_tokens)
            row = {"iteration": iteration, "generation_s": generation_times[-1],
                   "generation_tokens_per_s": generated / generation_times[-1],
                   "scoring_s": collected - start - generation_times[-1], "train_s": done - collected,
                   "train_tokens_per_s": trained / (done - collected), "warmup": iteration == 0}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        timed = [r for r in rows if not r["warmup"]] or rows
        summary = {"preset": args.preset, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "precision": resolve_precision(trainer.cfg.train.precision, trainer.device), "prompts": args.prompts, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "epochs": args.epochs,
                   "decode": "graphs" if trainer.generator.graphs else args.decode,
                   "layer_graphs": args.cuda_graphs,
                   "generation_tokens_per_s": sum(r["generation_tokens_per_s"] for r in timed) / len(timed),
                   "train_tokens_per_s": sum(r["train_tokens_per_s"] for r in timed) / len(timed),
                   "iteration_s": sum(r["generation_s"] + r["scoring_s"] + r["train_s"] for r in timed) / len(timed),
                   "peak_mem_gib": peak_memory_gib(trainer.device)}
        print("summary " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()}),
              flush=True)
        return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.launch import UserError, report_user_error

    try:
        run(args)
    except UserError as error:
        return report_user_error(error)
    from engine.training import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
