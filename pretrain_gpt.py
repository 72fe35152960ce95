"""Pretrain a GPT model: `torchrun --nproc-per-node N pretrain_gpt.py --config FILE [--section.key value ...]`.

Run `python pretrain_gpt.py --help` for the configuration keys.
"""
from __future__ import annotations

import os
import sys

from engine.config import describe_keys, parse_args, validate
from engine.launch import UserError, report_user_error


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + describe_keys())
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = validate(parse_args(argv), world_size)
        from engine.training import Trainer, shutdown  # after validation: no process group on bad input

        trainer = Trainer(cfg)
        trainer.train()
    except UserError as error:
        return report_user_error(error)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
