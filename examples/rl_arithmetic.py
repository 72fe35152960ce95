"""PPO and GRPO on a verifiable task, on the CPU: learn to add.

    python examples/rl_arithmetic.py                 # all stages
    python examples/rl_arithmetic.py --stage ppo     # one stage: data | pretrain | ppo | grpo

1. data: a character-level tokenizer and 20,000 solved problems "a+b=c" (operands 0..19),
   one document each, written to runs/rl_arithmetic/data.
2. pretrain: the tiny Llama-style model trained briefly on them (examples/rl_arithmetic_pretrain.yaml),
   so it knows the format and gets some sums right.
3. ppo / grpo: from that checkpoint, prompts "a+b=" drawn by the run (rl.task arithmetic) and the
   rule reward (1 for the exact sum, 0.5 x the matching leading fraction otherwise;
   examples/rl_arithmetic_{ppo,grpo}.yaml). Every iteration's mean reward goes to
   runs/rl_arithmetic/{ppo,grpo}/metrics.jsonl; the script prints the first and last.

Each stage runs `python pretrain_gpt.py --config ...` (printed before it starts), with
OMP_NUM_THREADS=1 unless set; everything is seeded, so a rerun gives the same curves.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RUNS = "runs/rl_arithmetic"


MAX_OPERAND = 19  # as rl.arithmetic_max in the PPO / GRPO configs


def prepare_data(problems: int = 20000) -> None:
    from engine.data.tokenizer import build_tokenizer
    from engine.rl.arithmetic_data import solved_problems, write_char_tokenizer, write_corpus

    folder = write_char_tokenizer(os.path.join(RUNS, "data", "tok"))
    tokenizer = build_tokenizer("hf", folder)
    write_corpus(os.path.join(RUNS, "data", "arith"), tokenizer, solved_problems(problems, MAX_OPERAND, seed=0))
    print(f"wrote {folder} ({tokenizer.vocab_size} tokens) and {problems} problems to {RUNS}/data/arith", flush=True)


def run(config: str, *extra: str) -> float:
    command = [sys.executable, "pretrain_gpt.py", "--config", config, *extra]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={"OMP_NUM_THREADS": "1", **os.environ})
    return time.perf_counter() - start


def reward_curve(objective: str) -> list:
    with open(os.path.join(ROOT, RUNS, objective, "metrics.jsonl")) as handle:
        return [json.loads(line)["reward_mean"] for line in handle if "reward_mean" in line]


def rl_stage(objective: str) -> None:
    metrics = os.path.join(ROOT, RUNS, objective, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # the logger appends; one run per file
    seconds = run(f"examples/rl_arithmetic_{objective}.yaml")
    curve = reward_curve(objective)
    print(f"{objective}: mean reward {curve[0]:.3f} (iteration 1) -> {curve[-1]:.3f} (iteration {len(curve)}); "
          f"best {max(curve):.3f}; {seconds:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--stage", choices=["all", "data", "pretrain", "ppo", "grpo"], default="all")
    stage = parser.parse_args(argv).stage
    os.chdir(ROOT)
    if stage in ("all", "data"):
        prepare_data()
    if stage in ("all", "pretrain"):
        run("examples/rl_arithmetic_pretrain.yaml")
    for objective in ("ppo", "grpo"):
        if stage in ("all", objective):
            rl_stage(objective)
    return 0


if __name__ == "__main__":
    sys.exit(main())
