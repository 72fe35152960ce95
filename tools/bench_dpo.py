"""DPO throughput: Trellis vs TRL's DPOTrainer on the same model, data and GPU, in one launch.

    python tools/bench_dpo.py --preset llama-1.3b --prompt 512 --response 511 --pairs 4 --out bench_dpo.json
    python tools/bench_dpo.py --preset tiny --prompt 24 --response 23 --pairs 2 --steps 2 --warmup 1 --device cpu

Both stacks train the same preset from random weights (TRL: Hugging Face LlamaForCausalLM built
from the same configuration) on the same preference pairs: random words of a synthetic
word-level tokenizer, every prompt `--prompt` tokens and every response `--response` tokens plus
EOS, so each sequence has exactly prompt + response + 1 tokens in both stacks and neither pads.
Each stack runs in its own child process (clean peak-memory numbers), one after the other, with
bf16 mixed precision on CUDA (Trellis: bf16 weights and fp32 master weights; TRL: fp32 weights
under bf16 autocast), AdamW, no activation recompute / gradient checkpointing, the reference
model a frozen copy computed on the fly, sigmoid loss, beta 0.1. tokens/s counts the chosen and
rejected sequences of a step once each; MFU counts the work done on them: the policy's forward
and backward and the reference's forward (4/3 of a training step's model FLOPs).
Warm-up steps are excluded; the median step is reported. Extra `--section.key value` arguments
go to the Trellis configuration.

TRL is not a dependency of Trellis: install trl (and datasets) to run its row; without it the
TRL row reports the import error and Trellis's row still comes out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tools.benchmark import mfu_text, summarise, timed_steps  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "</s>"]


def parse_cli(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1.3b")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per pair")
    p.add_argument("--response", type=int, default=511, help="tokens per response, before EOS")
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (2x sequences per forward)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--stacks", default="trellis,trl")
    p.add_argument("--out", default="")
    p.add_argument("--stack", default="", help=argparse.SUPPRESS)  # a child process: run this one stack
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


# ---- shared data: a word-level tokenizer and random pairs ---------------------------------------
def write_tokenizer(folder: str, vocab_size: int) -> str:
    """tokenizer.json mapping the words w0, w1, ... (and the specials) to ids, whitespace-split."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i + len(SPECIALS) for i in range(vocab_size - len(SPECIALS))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)  # matched before splitting, so "w5</s>" is two tokens
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"eos_token": "</s>", "pad_token": "<pad>"}, handle)
    return folder


def write_pairs(path: str, count: int, args, vocab_size: int) -> str:
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        ids = torch.randint(len(SPECIALS), vocab_size, (n,), generator=generator) - len(SPECIALS)
        return " ".join(f"w{i}" for i in ids.tolist())

    with open(path, "w") as handle:
        for _ in range(count):
            # Responses start with a space: TRL joins prompt + response as text before tokenizing.
            record = {"prompt": words(args.prompt), "chosen": " " + words(args.response),
                      "rejected": " " + words(args.response)}
            handle.write(json.dumps(record) + "\n")
    return path


# ---- the two stacks ---------------------------------------------------------------------------------
def dpo_flops_per_token(model_cfg) -> float:
    """Policy forward + backward (3 passes) and reference forward (1 pass): 4/3 of training FLOPs."""
    return model_cfg.flops_per_token() * 4 / 3


def run_trellis(args, extra, workdir):
    from engine.config import parse_args, validate
    from engine.dpo import DPOTrainer
    from engine.metrics import device_peak_tflops

    seq = args.prompt + args.response + 1
    argv = ["--model.preset", args.preset, "--model.seq_length", str(seq), "--train.objective", "dpo",
            "--data.preference_train", os.path.join(workdir, "pairs.jsonl"), "--data.preference_format", "text",
            "--data.tokenizer_type", "hf", "--data.tokenizer", workdir, "--train.micro_batch_size", str(args.pairs),
            "--train.iters", str(args.warmup + args.steps), "--train.device", args.device, "--dpo.beta", "0.1",
            "--log.quiet", "true", "--train.output_dir", os.path.join(workdir, "trellis")] + extra
    cfg = validate(parse_args(argv), 1)
    trainer = DPOTrainer(cfg)
    times, mem = timed_steps(trainer.train_step, args.warmup, args.steps, trainer.device)
    peak = device_peak_tflops(trainer.device, cfg.log.peak_tflops)
    row = summarise("trellis", times, 2 * args.pairs * seq, dpo_flops_per_token(cfg.model), 1, peak, mem)
    return {**row, "config": " ".join(argv)}


def hf_llama(preset: str, seq: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.config import ModelConfig, resolve_preset

    m = resolve_preset(ModelConfig(preset=preset, seq_length=seq))
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
                         rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                         attn_implementation="sdpa")
    with torch.device(device):  # initialised on the GPU: seconds, not minutes on the CPU
        return LlamaForCausalLM(config), m


def step_timer(device):
    """A TrainerCallback timing each optimizer step to the device's completion."""
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        times, start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def run_trl(args, workdir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from engine.metrics import device_peak_tflops

    device = torch.device(args.device)
    seq = args.prompt + args.response + 1
    torch.manual_seed(0)
    model, m = hf_llama(args.preset, seq, device)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(workdir, "tokenizer.json"),
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    data = datasets.load_dataset("json", data_files=os.path.join(workdir, "pairs.jsonl"), split="train")
    cuda = device.type == "cuda"
    config = DPOConfig(output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.pairs,
                       max_steps=args.warmup + args.steps, learning_rate=3e-4, beta=0.1, loss_type=["sigmoid"],
                       max_length=seq, bf16=cuda, gradient_checkpointing=False, logging_steps=10**6,
                       save_strategy="no", report_to=[], dataset_num_proc=None, use_cpu=not cuda,
                       dataloader_num_workers=0, disable_tqdm=True, seed=0)
    timer = step_timer(device)
    # The reference: a frozen copy of the starting weights (TRL would otherwise load it by the model's hub name).
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peak = device_peak_tflops(device, 0.0)
    return summarise("trl", timer.times[args.warmup:], 2 * args.pairs * seq, dpo_flops_per_token(m), 1, peak, mem)


# ---- the launch: data once, each stack in a child process, one table ------------------------------
def child(args, extra) -> None:
    try:
        row = run_trellis(args, extra, args.workdir) if args.stack == "trellis" else run_trl(args, args.workdir)
    except ImportError as error:
        row = {"name": args.stack, "error": f"{type(error).__name__}: {error}"}
    print("ROW " + json.dumps(row), flush=True)


def run_child(stack: str, argv: list, workdir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--stack", stack, "--workdir", workdir] + argv
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode != 0 or not rows:
        return {"name": stack, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(rows[-1])


def print_table(rows) -> None:
    print("| stack | tokens/s | step s | MFU | peak memory GiB | Trellis / this |")
    print("|---|---|---|---|---|---|")
    ours = rows[0].get("tokens_per_s")
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | error: {row['error']} | | | | |")
            continue
        mfu = mfu_text(row)
        ratio = f"{ours / row['tokens_per_s']:.2f}x" if ours else "-"
        print(f"| {row['name']} | {row['tokens_per_s']:.0f} | {row['step_s']:.3f} | {mfu} | "
              f"{row['peak_mem_gib']:.1f} | {ratio} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_cli(argv)
    if args.stack:
        child(args, extra)
        return 0
    from models.config import ModelConfig, resolve_preset

    vocab = resolve_preset(ModelConfig(preset=args.preset)).vocab_size
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as workdir:
        write_tokenizer(workdir, vocab)
        write_pairs(os.path.join(workdir, "pairs.jsonl"), args.pairs * (args.warmup + args.steps), args, vocab)
        rows = [run_child(stack, argv, workdir) for stack in args.stacks.split(",")]
    print_table(rows)
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
        with open(args.out, "w") as handle:
            json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
