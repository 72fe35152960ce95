"""Build preference pairs from real text on the machine: for each short documented function of
the Python standard library, the prompt asks for its body given signature and docstring, the
chosen response is the real body and the rejected one a corrupted body.

    python examples/prepare_dpo_data.py     # -> data/dpo_stdlib_{train,valid}.jsonl

Corruptions take turns among --corruptions (by a hash of the function, so the data is the same
on every run; a kind that cannot change a body hands it to the next):
  shuffle  the body's lines in another order (bodies of two or more distinct lines)
  swap     two different tokens of the body (names, numbers, operators, brackets) trade places
  other    the body of another function of the same split, of about the same length (one of
           the 8 nearest in characters), so that length alone does not tell the two apart
By default (shuffle and swap) a corruption counts only when the result no longer parses as a
function body (up to 20 tries): a shuffle of independent lines or a swap of two names can leave
an equally good body, a pair without a real preference. --allow-parseable keeps those too.
Whole modules go to validation (one in 20 by a hash of the module name, as
prepare_sft_data.py), so no validation pair shares a file with a training pair.
"""
from __future__ import annotations

import ast
import bisect
import hashlib
import json
import os
import random
import re
import sys
import textwrap
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_sft_data import functions_by_split, parse_cli  # noqa: E402

CORRUPTIONS = ("shuffle", "swap", "other")
TOKEN = re.compile(r"\w+|[^\w\s]")  # a name or number, or one punctuation character


def parses(body: str) -> bool:
    try:
        with warnings.catch_warnings():  # a swapped body may hold odd literals; only the verdict matters
            warnings.simplefilter("ignore")
            ast.parse("def f():\n" + textwrap.indent(body, "    "))
    except SyntaxError:
        return False
    return True


def broken(make, body: str, rng: random.Random, tries: int = 20) -> str | None:
    """make(body, rng), retried until the result does not parse."""
    for _ in range(tries):
        corrupted = make(body, rng)
        if corrupted is None or not parses(corrupted):
            return corrupted
    return None


def shuffled_lines(body: str, rng: random.Random) -> str | None:
    lines = body.splitlines()
    if len(set(lines)) < 2:
        return None
    order = lines[:]
    while order == lines:
        rng.shuffle(order)
    return "\n".join(order)


def swapped_tokens(body: str, rng: random.Random) -> str | None:
    spans = [m.span() for m in TOKEN.finditer(body)]
    for _ in range(20):
        if len(spans) < 2:
            return None
        (a0, a1), (b0, b1) = sorted(rng.sample(spans, 2))
        if body[a0:a1] != body[b0:b1]:
            return body[:a0] + body[b0:b1] + body[a1:b0] + body[a0:a1] + body[b1:]
    return None


def similar_length_body(body: str, rng: random.Random, bodies: list) -> str | None:
    """One of the 8 other bodies closest in length (`bodies` sorted by length)."""
    where = bisect.bisect_left(bodies, len(body), key=len)
    near = [b for b in bodies[max(0, where - 5):where + 5] if b.strip() != body.strip()]
    near.sort(key=lambda b: abs(len(b) - len(body)))
    return rng.choice(near[:8]) if near else None


def corrupt(body: str, kind: str, rng: random.Random, bodies: list, broken_only: bool) -> str | None:
    if kind == "other":
        return similar_length_body(body, rng, bodies)
    make = shuffled_lines if kind == "shuffle" else swapped_tokens
    return broken(make, body, rng) if broken_only else make(body, rng)


def make_pairs(functions: list, kinds=CORRUPTIONS, broken_only: bool = False) -> list:
    """One preference record per (instruction, body); the corruption is chosen by hash among
    `kinds`, falling back to the next kind when it cannot change this body."""
    bodies = sorted((body for _, body in functions), key=len)
    records = []
    for instruction, body in functions:
        seed = int(hashlib.sha256(instruction.encode()).hexdigest(), 16)
        rng = random.Random(seed)
        for offset in range(len(kinds)):
            kind = kinds[(seed + offset) % len(kinds)]
            rejected = corrupt(body, kind, rng, bodies, broken_only)
            if rejected is not None:
                records.append({"prompt": instruction, "chosen": body, "rejected": rejected, "corruption": kind})
                break
    return records


def main(argv=None) -> int:
    args = parse_cli(__doc__, argv, extra=lambda p: (
        p.add_argument("--corruptions", default="shuffle,swap", help=f"kinds among {','.join(CORRUPTIONS)}"),
        p.add_argument("--name", default="dpo_stdlib", help="files are <out-dir>/<name>_{train,valid}.jsonl"),
        p.add_argument("--allow-parseable", action="store_true", help="keep shuffles and swaps that still parse")))
    kinds = tuple(args.corruptions.split(","))
    if not kinds or set(kinds) - set(CORRUPTIONS):
        raise SystemExit(f"error: --corruptions: choose from {', '.join(CORRUPTIONS)}")
    for split, functions in functions_by_split(args).items():
        records = make_pairs(functions, kinds, broken_only=not args.allow_parseable)
        out = os.path.join(args.out_dir, f"{args.name}_{split}.jsonl")
        with open(out, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        counts = {kind: sum(r["corruption"] == kind for r in records) for kind in kinds}
        print(f"{split}: {len(records)} pairs ({', '.join(f'{k} {n}' for k, n in counts.items())}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
