"""DPO training: the training loop with a preference loss and a frozen reference model (none
for the reference-free losses, SimPO and ORPO, which skip step 1 below).

Each micro-batch of b pairs is one batch of 2b sequences (chosen rows first, engine/dpo_data.py).
Per step and micro-batch:

1. Reference log-probs. Unless they were precomputed (dpo.reference_logps), a forward-only
   pipeline pass of the reference model over the micro-batches leaves, on the last stage, each
   sequence's summed response log-prob. The reference is laid out exactly as the policy (same
   TP/PP/virtual-stage split): with LoRA it is the policy itself with its adapters switched off
   (no second copy of the base), otherwise a frozen copy of the weights the run starts from.
2. Policy pass. The training schedule (1F1B or interleaved) runs the policy; the last stage
   turns the per-token cross-entropy (vocab-parallel: the logits stay split over TP) into
   sequence log-probs and the preference loss of its pairs, divided by the global batch's
   pair count, so the sum over micro-batches and data-parallel ranks is the mean over pairs.

The implicit rewards beta (log pi - log ref), their margin and the share of pairs ranked right
are summed on the last stage and logged per step (and for validation with a val_ prefix).
"""
from __future__ import annotations

import contextlib
import types

import torch

from engine.checkpoint import load_checkpoint, read_meta, resolve_step_dir
from engine.config import ADAPTER_METHODS, REFERENCE_FREE_DPO_LOSSES, ConfigError
from engine.dpo_data import collate_pairs
from engine.dpo_loss import preference_loss, reference_free_loss, reward_metrics, reward_sums, sequence_logps
from engine.training import CONSOLE_KEYS, Trainer
from parallel import comm
from parallel.lora import adapters_disabled
from parallel.pipeline.schedules import run_schedule


class DPOTrainer(Trainer):
    sequences_per_sample = 2
    collate_batch = staticmethod(collate_pairs)
    console_keys = CONSOLE_KEYS + ("accuracy", "margin", "val_loss", "val_accuracy", "val_margin")

    def __init__(self, cfg, monitor=None, reference_copy: bool = True):
        """reference_copy False: the policy's own weights serve as the reference (only right
        before the first update, which is what tools/dpo_reference_logps.py needs)."""
        super().__init__(cfg, monitor)
        self.reward_totals = torch.zeros(3, device=self.device)
        self.reference_chunks = self.build_reference(reference_copy)

    # ---- the reference model ----------------------------------------------------------------
    def build_reference(self, reference_copy: bool):
        """None for a reference-free loss or when the batches carry precomputed log-probs; the
        policy's chunks with LoRA (run with the adapters off); else a frozen copy in the same
        layout."""
        if self.cfg.dpo.loss in REFERENCE_FREE_DPO_LOSSES or self.cfg.dpo.reference_logps:
            return None
        if self.cfg.finetune.method in ADAPTER_METHODS or not reference_copy:
            return self.model_chunks
        self.check_resumed_reference()
        chunks = self.build_model_chunks()
        for reference in chunks:
            reference.requires_grad_(False)
        if self.cfg.dpo.reference_checkpoint:
            holder = types.SimpleNamespace(model_chunks=chunks, grid=self.grid, cfg=self.cfg, step=0)
            load_checkpoint(holder, self.cfg.dpo.reference_checkpoint, -1, model_only=True)
        else:  # the weights the run starts from: loaded or initialised by now
            for reference, policy in zip(chunks, self.model_chunks):
                reference.load_state_dict(policy.state_dict())
        return chunks

    def check_resumed_reference(self) -> None:
        """A resumed full DPO fine-tune no longer holds its starting weights."""
        c = self.cfg.checkpoint
        if not c.load or c.load_model_only or self.cfg.dpo.reference_checkpoint:
            return
        saved = read_meta(resolve_step_dir(c.load, c.load_step)).get("config", {})
        if saved.get("train", {}).get("objective") == "dpo":
            raise ConfigError(f"dpo.reference_checkpoint: resuming the DPO run in {c.load} needs the reference "
                              "weights; set it to the checkpoint that run started from, or use dpo.reference_logps")

    @contextlib.contextmanager
    def reference_mode(self):
        """The reference runs without dropout and, on the policy's own chunks, without adapters."""
        chunks = self.reference_chunks
        modes = [chunk.training for chunk in chunks]
        for chunk in chunks:
            chunk.eval()
        try:
            with adapters_disabled(chunks):
                yield
        finally:
            for chunk, mode in zip(chunks, modes):
                chunk.train(mode)

    def attach_reference_logps(self, batches) -> None:
        """batch["reference_logps"] [2b] on the last stage, from a forward-only pipeline pass."""
        if self.reference_chunks is None:
            return  # precomputed (collated into the batches), or a loss without a reference
        with torch.no_grad(), self.reference_mode():
            result = run_schedule(self.sequence_logps_step(self.reference_chunks, batches), len(batches),
                                  len(self.reference_chunks), self.pipeline_comm, None, True, self.pipeline_tracer)
        for batch, logps in zip(batches, result.losses):  # empty except on the last stage
            batch["reference_logps"] = logps

    # ---- forward steps --------------------------------------------------------------------
    def sequence_logps_step(self, chunks, batches):
        """Schedule callback: a stage's hidden state, or on the last stage the summed response
        log-prob of each of the micro-batch's 2b sequences."""
        def forward_step(chunk_index: int, microbatch: int, input_tensor):
            model, batch = chunks[chunk_index], batches[microbatch]
            tokens = batch["tokens"] if model.pre_process else None
            with self.autocast():
                if not model.post_process:
                    return model(tokens, hidden=input_tensor).to(self.pipeline_comm.dtype)
                token_loss = model(tokens, hidden=input_tensor, labels=batch["labels"])  # [2b, s], vocab-parallel
            return sequence_logps(token_loss, batch["loss_mask"])
        return forward_step

    def preference_step(self, batches, sums: torch.Tensor):
        """Schedule callback: on the last stage the micro-batch's summed pair losses / global
        pair count (its reward sums are added to `sums`); elsewhere the hidden state."""
        logps_step = self.sequence_logps_step(self.model_chunks, batches)

        def forward_step(chunk_index: int, microbatch: int, input_tensor):
            output = logps_step(chunk_index, microbatch, input_tensor)
            if not self.model_chunks[chunk_index].post_process:
                return output
            losses, chosen, rejected = self.pair_losses(output, batches[microbatch])
            sums.add_(reward_sums(chosen, rejected))
            return losses.sum() / self.cfg.train.global_batch_size
        return forward_step

    def pair_losses(self, logps: torch.Tensor, batch: dict):
        """Per-pair losses and rewards of a micro-batch's 2b summed response log-probs (chosen
        rows first)."""
        d, pairs = self.cfg.dpo, logps.shape[0] // 2
        if d.loss in REFERENCE_FREE_DPO_LOSSES:
            tokens = batch["loss_mask"].sum(dim=-1).to(logps.dtype)
            return reference_free_loss(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:], d.beta, d.loss,
                                       d.simpo_gamma, d.label_smoothing)
        reference = batch["reference_logps"]
        return preference_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], d.beta, d.loss,
                               d.label_smoothing)

    def run_pipeline(self, batches, forward_only: bool) -> torch.Tensor:
        self.attach_reference_logps(batches)
        sums = torch.zeros(3, device=self.device)
        loss = self.run_loss_schedule(self.preference_step(batches, sums), len(batches), forward_only)
        sums = self.broadcast_from_last_stage(sums)
        comm.all_reduce(sums, self.grid.dp_group)
        self.reward_totals += sums
        return loss

    # ---- steps and evaluation with reward metrics ------------------------------------------
    def train_step(self) -> dict:
        self.reward_totals.zero_()
        record = super().train_step()
        return {**record, **reward_metrics(self.reward_totals, record["global_batch"])}

    def validation_record(self) -> dict:
        self.reward_totals.zero_()
        loss = self.evaluate()
        pairs = self.cfg.train.global_batch_size * self.cfg.train.eval_iters
        return {"val_loss": loss, **reward_metrics(self.reward_totals, pairs, prefix="val_")}
