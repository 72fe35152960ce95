"""Build instruction data from real text on the machine: docstring -> function body pairs from
the Python standard library.

    python examples/prepare_sft_data.py     # -> data/sft_stdlib_{train,valid}.jsonl

Every function with a docstring becomes {"instruction": "Write the body of this function:
<signature>\\n<docstring>", "output": <the body's source, docstring removed>}. Short pairs only
(the tiny model trains on 256-token sequences). Whole modules go to the validation split (one
in 20, chosen by a hash of the module name), so no validation function shares a file with a
training function.
"""
from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(os.__file__)


def stdlib_modules() -> list[str]:
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")) + glob.glob(os.path.join(STDLIB, "*", "*.py")))
    return [f for f in files if "test" not in os.path.relpath(f, STDLIB) and "site-packages" not in f]


def body_without_docstring(source: str, node: ast.FunctionDef) -> str:
    statements = node.body[1:]  # body[0] is the docstring
    if not statements:
        return ""
    lines = source.splitlines()[statements[0].lineno - 1:statements[-1].end_lineno]
    return textwrap.dedent("\n".join(lines))


def function_pairs(path: str, max_instruction: int, max_output: int):
    """(instruction, output) for each short documented function of one module."""
    try:
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
            continue
        body = body_without_docstring(source, node)
        signature = f"def {node.name}({ast.unparse(node.args)}):"
        instruction = f"Write the body of this function:\n{signature}\n{ast.get_docstring(node)}"
        if body.strip() and len(instruction) <= max_instruction and len(body) <= max_output:
            yield instruction, body


def is_validation_module(path: str, one_in: int) -> bool:
    name = os.path.relpath(path, STDLIB)
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % one_in == 0


def parse_cli(doc: str, argv=None, extra=None) -> argparse.Namespace:
    """The data scripts' options; `extra(parser)` adds a script's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--max-instruction-chars", type=int, default=300)
    p.add_argument("--max-output-chars", type=int, default=300)
    p.add_argument("--valid-one-in", type=int, default=20, help="one module in N goes to validation")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    return args


def functions_by_split(args) -> dict:
    """{"train": [(instruction, body), ...], "valid": [...]}, validation by whole modules."""
    splits = {"train": [], "valid": []}
    for path in stdlib_modules():
        split = "valid" if is_validation_module(path, args.valid_one_in) else "train"
        splits[split] += function_pairs(path, args.max_instruction_chars, args.max_output_chars)
    return splits


def main(argv=None) -> int:
    args = parse_cli(__doc__, argv)
    for split, pairs in functions_by_split(args).items():
        records = [{"instruction": instruction, "output": output} for instruction, output in pairs]
        out = os.path.join(args.out_dir, f"sft_stdlib_{split}.jsonl")
        with open(out, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{split}: {len(records)} pairs -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
