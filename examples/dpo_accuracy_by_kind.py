"""Held-out preference accuracy per corruption kind of examples/prepare_dpo_data.py's pairs.

    python tools/dpo_reference_logps.py --splits valid --out runs/logps_base --config examples/dpo_tiny.yaml \
        --checkpoint.load runs/tiny_ckpt
    python tools/dpo_reference_logps.py --splits valid --out runs/logps_dpo --config examples/dpo_tiny.yaml \
        --checkpoint.load runs/dpo_tiny_ckpt
    python examples/dpo_accuracy_by_kind.py data/dpo_stdlib_valid.jsonl runs/logps_base runs/logps_dpo

A pair counts as ranked right when its DPO implicit reward is higher for the chosen body:
(log pi - log ref)(chosen) > (log pi - log ref)(rejected), pi the trained model's summed
response log-probs and ref the base's. With only the base's directory it reports how often the
base model alone gives the chosen body the higher log-prob.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    kinds = np.array([json.loads(line)["corruption"] for line in open(argv[0]) if line.strip()])
    reference = np.load(f"{argv[1]}/valid.npz")["logps"]
    policy = np.load(f"{argv[2]}/valid.npz")["logps"] if len(argv) == 3 else reference
    ratios = policy - reference if len(argv) == 3 else policy
    right = ratios[:, 0] > ratios[:, 1]
    print(f"all: {right.mean():.3f} of {len(right)}")
    for kind in sorted(set(kinds)):
        print(f"{kind}: {right[kinds == kind].mean():.3f} of {(kinds == kind).sum()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
