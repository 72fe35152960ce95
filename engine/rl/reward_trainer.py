"""Reward-model training (`train.objective reward`): a Bradley-Terry model of preferences.

Each micro-batch holds n pairs as 2n sequences (chosen, then rejected) that travel through the
pipeline together. The last stage scores each sequence with the scalar head at its last real
token, r, and the loss is -log sigmoid(r_chosen - r_rejected), averaged over the pairs of the
global batch (each micro-batch's sum divided by the global pair count, as the LM loss divides
by the token count). Accuracy (r_chosen > r_rejected) and the mean margin are logged with the
step; `val_accuracy` with each evaluation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.rl.common import ScalarHeadTrainer, sum_over_replicas
from engine.rl.data import collate_pairs
from engine.training import CONSOLE_KEYS
from models.value_head import last_token_scores
from parallel import comm


class RewardTrainer(ScalarHeadTrainer):
    with_scalar_head = True
    console_keys = CONSOLE_KEYS[:3] + ("accuracy", "reward_margin") + CONSOLE_KEYS[3:] + ("val_loss",)
    sequences_per_sample = 2  # chosen and rejected
    collate_batch = staticmethod(collate_pairs)

    def global_token_count(self, batches) -> torch.Tensor:
        """The loss normaliser: pairs in the global batch."""
        count = torch.tensor(float(sum(len(b["last_index"]) // 2 for b in batches)), device=self.device)
        comm.all_reduce(count, self.grid.dp_group)
        return count

    def forward_step_fn(self, batches, total_pairs):
        def forward_step(chunk_index: int, microbatch: int, input_tensor):
            model, batch = self.model_chunks[chunk_index], batches[microbatch]
            with self.autocast():
                out = model(batch["tokens"] if model.pre_process else None, hidden=input_tensor,
                            return_hidden=model.post_process)
                if not model.post_process:
                    return out.to(self.pipeline_comm.dtype)
                scores = last_token_scores(model.scalar_head(out), batch["last_index"])
            chosen, rejected = scores.chunk(2)
            margin = chosen - rejected
            self.pair_stats.append(torch.stack([(margin > 0).sum().float(), margin.sum(), margin.new_tensor(len(margin))]).detach())
            return -F.logsigmoid(margin).sum() / total_pairs
        return forward_step

    def pair_summary(self) -> dict:
        local = torch.stack(self.pair_stats).sum(0).tolist() if self.pair_stats else [0.0, 0.0, 0.0]
        correct, margin, pairs = sum_over_replicas(local, self.grid, self.device)
        return {"accuracy": correct / pairs, "reward_margin": margin / pairs}

    def train_step(self) -> dict:
        self.pair_stats = []
        record = super().train_step()
        record.update(self.pair_summary())
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        self.pair_stats = []
        loss = super().evaluate()
        summary = self.pair_summary()
        self.logger.log({"step": self.step, "val_accuracy": summary["accuracy"],
                         "val_reward_margin": summary["reward_margin"]}, ("step", "val_accuracy"))
        return loss
