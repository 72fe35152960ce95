"""Pretrain a GPT model: `torchrun --nproc-per-node N pretrain_gpt.py --config FILE [--section.key value ...]`.

Run `python pretrain_gpt.py --help` for the configuration keys.
"""
from __future__ import annotations

import os
import sys

from engine.config import describe_keys, parse_args, validate
from engine.launch import (RunMonitor, UserError, is_collective_failure, report_collective_failure,
                           report_termination, report_user_error)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + describe_keys())
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    monitor = RunMonitor()
    report_termination(monitor)
    try:
        cfg = validate(parse_args(argv), world_size)
        from engine.training import shutdown, trainer_class  # after validation: no process group on bad input

        trainer = trainer_class(cfg.train.objective)(cfg, monitor)
        trainer.train()
        monitor.operation = "final barrier"
        shutdown()
    except UserError as error:
        return report_user_error(error)
    except Exception as error:  # noqa: BLE001 - only distributed failures are handled here
        if world_size > 1 and is_collective_failure(error):
            report_collective_failure(error, monitor)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
