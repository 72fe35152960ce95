"""Data-pipeline speed: preprocessing throughput and sample-index build time.

    python tools/bench_data.py [--tokens 100000000] [--seq-length 2048]

1. Preprocessing: the Python standard library's sources (as JSONL, one file per document)
   tokenized with a 4096-piece sentencepiece BPE model trained on them, with 1 and 2 workers;
   MB/s of input text and tokens/s, end to end (reading, tokenizing, writing .bin/.idx).
2. Sample index for a dataset of --tokens tokens (document lengths drawn from a lognormal
   distribution with mean ~600 tokens; only the lengths matter): one epoch of samples, built
   with the C++ builder and with its Python twin, timed in parts.
3. Blending indices for 10M samples over 3 datasets, C++ and Python twin (Python on 1M and
   scaled, it is linear).

Prints a Markdown table for docs/data.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csrc.loader import cpp_helpers  # noqa: E402
from engine.data import sample_index as si  # noqa: E402
from tools import preprocess_data, train_tokenizer  # noqa: E402


def timed(fn, *args, repeats: int = 1):
    """(result, best wall time of `repeats` runs): the best run is the least disturbed by
    other processes on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenizer workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stdlib_jsonl(path: str) -> int:
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    files = [f for f in files if "site-packages" not in f]
    with open(path, "w") as out:
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as src:
                out.write(json.dumps({"text": src.read()}) + "\n")
    return len(files)


def bench_preprocess(work: str) -> list[str]:
    corpus = os.path.join(work, "stdlib.jsonl")
    num_files = stdlib_jsonl(corpus)
    model = os.path.join(work, "tok")
    train_tokenizer.main(["--input", os.path.join(os.path.dirname(os.__file__), "*.py"),
                          "--output-prefix", model, "--vocab-size", "4096", "--max-lines", "300000"])
    rows = []
    for workers in (1, 2):
        args = preprocess_data.parse_args(["--input", corpus, "--output-prefix", os.path.join(work, f"out{workers}"),
                                           "--tokenizer-type", "sentencepiece", "--tokenizer-model", model + ".model",
                                           "--workers", str(workers), "--log-interval", "1000"])
        cpu_before = cpu_seconds()
        stats = preprocess_data.preprocess(args)
        cpu = cpu_seconds() - cpu_before
        mb = stats["bytes"] / 1e6
        rows.append(f"| preprocess, {workers} worker(s) | {num_files} files, {mb:.1f} MB, {stats['tokens'] / 1e6:.1f}M tokens "
                    f"| {stats['seconds']:.1f} s wall, {cpu:.1f} CPU-s | {mb / stats['seconds']:.2f} MB/s, "
                    f"{stats['tokens'] / stats['seconds'] / 1e6:.2f}M tokens/s; {mb / cpu:.2f} MB per CPU-s |")
    return rows


def synthetic_sizes(num_tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = np.maximum(rng.lognormal(mean=6.0, sigma=1.0, size=num_tokens // 300), 1).astype(np.int64)
    sizes = sizes[np.cumsum(sizes) <= num_tokens]
    return sizes.astype(np.int32)


def bench_sample_index(num_tokens: int, seq_length: int) -> list[str]:
    sizes = synthetic_sizes(num_tokens)
    documents = np.arange(len(sizes), dtype=np.int64)
    num_samples = si.samples_in(int(sizes.sum()), seq_length)
    rng = np.random.default_rng(0)
    doc_idx, t_doc = timed(si.build_doc_idx, documents, 1, rng)
    _, t_shuffle = timed(si.build_shuffle_idx, num_samples, 0, rng)
    label = f"{sizes.sum() / 1e6:.0f}M tokens, {len(sizes):,} docs, seq {seq_length}, {num_samples:,} samples"
    rows = [f"| doc + shuffle index (numpy, both paths) | {label} | {t_doc + t_shuffle:.3f} s | |"]
    results = {}
    for name, use_cpp in (("C++", True), ("Python twin", False)):
        if use_cpp and cpp_helpers() is None:
            rows.append("| sample index, C++ | extension not built | | |")
            continue
        results[name], seconds = timed(si.build_sample_idx, sizes, doc_idx, seq_length, num_samples, use_cpp, repeats=3)
        rows.append(f"| sample index, {name} | {label} | {seconds:.3f} s | |")
    if len(results) == 2:
        assert np.array_equal(results["C++"], results["Python twin"]), "C++ and Python sample indexes differ"
    return rows


def bench_blending() -> list[str]:
    weights = [0.5, 0.3, 0.2]
    rows = []
    if cpp_helpers() is not None:
        _, seconds = timed(si.build_blending_indices, weights, 10_000_000, True)
        rows.append(f"| blending index, C++ | 3 datasets, 10M samples | {seconds:.3f} s | |")
    _, seconds = timed(si.build_blending_indices_py, weights, 1_000_000)
    rows.append(f"| blending index, Python twin | 3 datasets, 1M samples (x10 for 10M) | {seconds:.3f} s | |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--skip-preprocess", action="store_true")
    args = p.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"cpus: {os.cpu_count()}, load average before: {load}, numpy {np.__version__}, date {time.strftime('%Y-%m-%d')}")
    print("| what | input | time | throughput |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        rows = [] if args.skip_preprocess else bench_preprocess(work)
    rows += bench_sample_index(args.tokens, args.seq_length)
    rows += bench_blending()
    print("\n".join(rows))
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
