"""What the reward and RL trainers share: a scalar head on the last stage that a pretrained
checkpoint may lack, and statistics reduced from the last pipeline stage over data parallelism."""
from __future__ import annotations

import torch

from engine.checkpoint import announce
from engine.inference import broadcast_from_last_stage, load_model_weights
from engine.training import Trainer
from models.value_head import HEAD_NAME, attach_scalar_head
from parallel import comm


class ScalarHeadTrainer(Trainer):
    """A Trainer whose last stage carries a ScalarHead (`with_scalar_head`), trained with the
    model by the one optimizer. A model-only load of a plain language model keeps the head's
    initial values; resuming a run of this objective restores it like any parameter."""

    with_scalar_head = False

    def build_model(self, dtype=torch.float32) -> list:
        chunks = super().build_model(dtype)
        if self.with_scalar_head and chunks[-1].post_process:
            attach_scalar_head(chunks[-1], self.cfg.train.seed)
            chunks[-1].to(dtype)  # the head drawn in fp32 like every weight, then rounded once
        return chunks

    def load_initial_checkpoint(self) -> None:
        c = self.cfg.checkpoint
        if not (c.load and c.load_model_only and self.with_scalar_head):
            return super().load_initial_checkpoint()
        step_dir = load_model_weights(self.model_chunks, self.grid, c.load, self.cfg.model, c.load_step,
                                      optional_prefixes=(f"model.{HEAD_NAME}.",))
        announce(self, f"checkpoint: loaded the weights of {step_dir} (model only; a {HEAD_NAME} it lacks starts fresh)")

    @property
    def head_chunk(self):
        """The chunk holding the output layer (and scalar head) on the last stage, else None."""
        last = self.model_chunks[-1]
        return last if last.post_process else None


def sum_over_replicas(values, grid, device) -> list:
    """Per-rank sums known on the last pipeline stage (zeros elsewhere) summed over data
    parallelism and returned on every rank, as floats."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    comm.all_reduce(total, grid.dp_group)
    return broadcast_from_last_stage(total, grid).tolist()
