"""PPO (`train.objective ppo`) and GRPO (`train.objective grpo`): one step of the run is one
iteration, a rollout followed by rl.epochs passes over it in minibatches.

Rollout (no gradients, dropout off): this DP rank's share of rl.prompts_per_iter prompts, each
repeated rl.group_size times, is continued by the KV-cache generator into sequences of exactly
model.seq_length tokens (prompt left-padded to seq_length - rl.max_new_tokens); the rule or the
reward model scores each response; the policy gives the rollout's log-probabilities (and, PPO,
values) and the frozen reference its log-probabilities. PPO then turns the score and a
per-token KL penalty into rewards and advantages by GAE; GRPO normalises the scores within
each prompt's group.

Optimisation: minibatches of train.global_batch_size sequences, cut into micro-batches that
run through the usual pipeline schedule; the last stage computes the clipped surrogate (PPO
adds the clipped value loss, GRPO the k3 KL term) as a sum over response tokens divided by
the minibatch's global response-token count. The critic is a ScalarHead on the policy's trunk.
The LR schedule advances once per iteration.
"""
from __future__ import annotations

import time

import torch

from engine.config import ConfigError
from engine.generation import TextGenerator
from engine.inference import build_chunks, freeze, load_model_weights
from engine.rl.common import ScalarHeadTrainer, sum_over_replicas
from engine.rl.losses import (KLController, clipped_policy_loss, clipped_value_loss, gae, group_advantages, kl_k3,
                              masked_whiten)
from engine.rl.scoring import RewardModelScorer, forward_batch, response_logprobs, response_values
from parallel import comm
from parallel.vocab_sampling import SamplingParams

CONSOLE = ("step", "reward_mean", "kl", "policy_loss", "value_loss", "kl_loss", "clip_frac", "response_length", "lr",
           "grad_norm", "rollout_s", "train_s")


class PolicyTrainer(ScalarHeadTrainer):
    console_keys = CONSOLE

    def __init__(self, cfg, monitor=None):
        super().__init__(cfg, monitor)
        r = cfg.rl
        self.task, self.tokenizer = self.train_data, self.train_data.tokenizer
        self.prompt_width = cfg.model.seq_length - r.max_new_tokens
        self.sampling = SamplingParams(r.temperature, r.top_k, r.top_p)
        dtype = next(self.model.parameters()).dtype
        self.reference = self.build_reference(dtype)
        self.reward_model = (RewardModelScorer(cfg, self.grid, self.rng, self.device, dtype, self.autocast)
                             if r.reward == "model" else None)
        self.generator = TextGenerator(self.model_chunks, self.grid, self.device, self.autocast, decode=r.decode)
        self.stop_id = self.tokenizer.eod_id  # a response ends here (None: always max_new_tokens)
        self.kl_controller = KLController(r.kl_coef, r.kl_target, r.kl_horizon)

    def build_reference(self, dtype) -> list:
        """The frozen reference: rl.reference, or a copy of the policy's starting weights."""
        p, c = self.cfg.parallel, self.cfg.checkpoint
        if c.load and not c.load_model_only and not self.cfg.rl.reference:
            # The loaded weights are a trained policy's, not the run's starting point.
            raise ConfigError("rl.reference: a resumed PPO/GRPO run needs its reference (the checkpoint the "
                              "policy started from) in rl.reference")
        chunks = build_chunks(self.cfg.model, self.grid, self.rng, self.device, dtype, self.cfg.train.seed,
                              p.vpp, p.pipeline_layers)
        if self.cfg.rl.reference:
            load_model_weights(chunks, self.grid, self.cfg.rl.reference, self.cfg.model)
        else:
            for reference, policy in zip(chunks, self.model_chunks):
                reference.load_state_dict(policy.state_dict(), strict=False)  # no scalar head, no adapters
        return freeze(chunks)

    def tokens_per_step(self) -> int:
        r = self.cfg.rl
        return r.prompts_per_iter * r.group_size * self.cfg.model.seq_length * r.epochs

    # ---- rollout ------------------------------------------------------------------------------
    def rollout_seed(self) -> int:
        """The same on every TP and PP rank of a replica, different per iteration and DP rank."""
        return (self.cfg.train.seed * 1_000_003 + self.step) * 1009 + self.grid.dp_rank

    @torch.no_grad()
    def collect_rollout(self) -> dict:
        r, grid = self.cfg.rl, self.grid
        per_rank = r.prompts_per_iter // grid.dp
        items = self.task.items(self.step * r.prompts_per_iter + grid.dp_rank * per_rank, per_rank)
        items = [item for item in items for _ in range(r.group_size)]
        for chunk in self.model_chunks:
            chunk.eval()
        generated = self.generator.generate(
            [item.ids for item in items], r.max_new_tokens, self.sampling, eos_id=self.stop_id,
            pad_id=self.tokenizer.pad_id, seed=self.rollout_seed(), prompt_width=self.prompt_width,
            vocab_limit=self.tokenizer.vocab_size)
        rollout = {"tokens": generated.tokens, "position_ids": generated.position_ids,
                   "document_ids": generated.document_ids, "response_mask": generated.response_mask.float()}
        rollout["scores"] = self.score(items, generated, rollout)
        rollout.update(self.read_policy_and_reference(rollout))
        rollout.update(self.advantages(rollout))
        return rollout

    def score(self, items, generated, rollout) -> torch.Tensor:
        if self.reward_model is not None:
            last_index = self.prompt_width + rollout["response_mask"].sum(1).long() - 1
            return self.reward_model.score(rollout, last_index)
        scores = [self.task.score(item, ids) for item, ids in zip(items, generated.response_lists())]
        return torch.tensor(scores, dtype=torch.float32, device=self.device)

    def read_rows(self, chunks, rollout, read, fields: int = 0) -> torch.Tensor:
        """`read(model, normed, micro-batch)` -> [m, n] (or [m, fields, n]) over the rollout in
        micro-batches; the result on the last stage, zeros on the others."""
        rows, size = rollout["tokens"].shape[0], self.cfg.rl.score_micro_batch or 4 * self.cfg.train.micro_batch_size
        out = torch.zeros(rows, *([fields] if fields else []), self.cfg.rl.max_new_tokens, device=self.device)
        for first in range(0, rows, size):
            part = {k: v[first:first + size] for k, v in rollout.items()}
            values = forward_batch(chunks, self.grid, self.autocast, part, lambda m, h: read(m, h, part))
            if values is not None:
                out[first:first + size] = values.float()
        return out

    def logprob_reader(self, model, normed, part):
        return response_logprobs(model, normed, part["tokens"], self.prompt_width, self.cfg.rl.temperature or 1.0,
                                 self.tokenizer.vocab_size)

    def read_policy_and_reference(self, rollout) -> dict:
        return {"old_logprobs": self.read_rows(self.model_chunks, rollout, self.logprob_reader),
                "ref_logprobs": self.read_rows(self.reference, rollout, self.logprob_reader)}

    def advantages(self, rollout) -> dict:
        raise NotImplementedError

    # ---- optimisation -------------------------------------------------------------------------
    def global_token_count(self, batches) -> torch.Tensor:
        count = sum(b["response_mask"].sum() for b in batches).float()
        comm.all_reduce(count, self.grid.dp_group)
        return count.clamp(min=1)

    def forward_step_fn(self, batches, total_tokens):
        def forward_step(chunk_index: int, microbatch: int, input_tensor):
            model, batch = self.model_chunks[chunk_index], batches[microbatch]
            with self.autocast():
                out = model(batch["tokens"] if model.pre_process else None, hidden=input_tensor,
                            position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                            return_hidden=model.post_process)
                if not model.post_process:
                    return out.to(self.pipeline_comm.dtype)
                logprobs = self.logprob_reader(model, out, batch)
                values = response_values(model, out, self.prompt_width) if self.with_scalar_head else None
            loss, stats = self.loss(batch, logprobs.float(), values)
            self.loss_stats.append(torch.stack([s.float() for s in stats]).detach())
            return loss / total_tokens
        return forward_step

    def policy_loss(self, batch, logprobs):
        mask = batch["response_mask"]
        policy, clipped = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                              self.cfg.rl.clip_ratio)
        return policy, clipped, mask.sum()

    def optimise(self, rollout) -> dict:
        """rl.epochs passes over the rollout in shuffled minibatches; mean statistics per token."""
        t, grid = self.cfg.train, self.grid
        rows, per_step = rollout["tokens"].shape[0], t.global_batch_size // grid.dp
        for chunk in self.model_chunks:
            chunk.train()
        totals, losses, norms = None, [], []
        for epoch in range(self.cfg.rl.epochs):
            shuffle = torch.Generator().manual_seed((t.seed * 7919 + self.step) * 131 + epoch)
            order = torch.randperm(rows, generator=shuffle).to(self.device)
            for first in range(0, rows, per_step):
                picked = order[first:first + per_step]
                batches = [{k: v[picked[i:i + t.micro_batch_size]] for k, v in rollout.items()}
                           for i in range(0, per_step, t.micro_batch_size)]
                self.optimizer.zero_grad()
                self.loss_stats = []
                loss = self.run_pipeline(batches, forward_only=False)
                comm.all_reduce(loss, grid.dp_group)
                norms.append(self.optimizer.step()["grad_norm"])
                losses.append(loss.item())
                step_stats = torch.stack(self.loss_stats).sum(0) if self.loss_stats else None
                totals = step_stats if totals is None else totals + step_stats
        return {"loss": sum(losses) / len(losses), "grad_norm": norms[-1], **self.loss_summary(totals)}

    def loss_summary(self, totals) -> dict:
        names = self.loss_stat_names
        sums = sum_over_replicas(totals.tolist() if totals is not None else [0.0] * len(names), self.grid, self.device)
        per = dict(zip(names, sums))
        tokens = max(per.pop("tokens"), 1.0)
        return {name: value / tokens for name, value in per.items()}

    # ---- one iteration -------------------------------------------------------------------------
    def rollout_summary(self, rollout) -> dict:
        mask = rollout["response_mask"]
        kl_per_sequence = ((rollout["old_logprobs"] - rollout["ref_logprobs"]) * mask).sum(1)
        local = [rollout["scores"].sum(), (rollout["scores"] == 1).float().sum(), mask.sum(), kl_per_sequence.sum(),
                 float(len(mask))]
        score_sum, exact, tokens, kl_sum, count = sum_over_replicas(local, self.grid, self.device)
        return {"reward_mean": score_sum / count, "exact_fraction": exact / count,
                "response_length": tokens / count, "kl": kl_sum / count}

    def train_step(self) -> dict:
        self.monitor.operation = f"iteration {self.step + 1} rollout"
        lr = self.scheduler.apply()
        start = time.perf_counter()
        rollout = self.collect_rollout()
        record = self.rollout_summary(rollout)
        middle = time.perf_counter()
        self.monitor.operation = f"iteration {self.step + 1} optimisation"
        record.update(self.optimise(rollout))
        record.update(self.after_iteration(record, rollout))
        self.scheduler.advance()
        self.step += 1
        done = time.perf_counter()
        return {"step": self.step, "lr": lr, **record, "rollout_s": middle - start, "train_s": done - middle}

    def after_iteration(self, record, rollout) -> dict:
        return {}


class PPOTrainer(PolicyTrainer):
    """Critic: a scalar head on the policy's trunk, trained with vf_coef x the clipped value loss."""

    with_scalar_head = True
    loss_stat_names = ("policy_loss", "value_loss", "clip_frac", "tokens")

    def read_policy_and_reference(self, rollout) -> dict:
        """The policy's log-probabilities and values come from one forward of its trunk."""
        def logprobs_and_values(model, normed, part):
            return torch.stack([self.logprob_reader(model, normed, part).float(),
                                response_values(model, normed, self.prompt_width).float()], dim=1)

        policy = self.read_rows(self.model_chunks, rollout, logprobs_and_values, fields=2)
        return {"old_logprobs": policy[:, 0], "old_values": policy[:, 1],
                "ref_logprobs": self.read_rows(self.reference, rollout, self.logprob_reader)}

    def advantages(self, rollout) -> dict:
        r, mask = self.cfg.rl, rollout["response_mask"]
        rewards = -self.kl_controller.value * (rollout["old_logprobs"] - rollout["ref_logprobs"]) * mask
        last = (mask.sum(1).long() - 1).clamp(min=0).unsqueeze(1)
        rewards = rewards.scatter_add(1, last, rollout["scores"].unsqueeze(1))
        advantages, returns = gae(rewards, rollout["old_values"], mask, r.gamma, r.lam)
        if r.whiten_advantages:
            advantages = masked_whiten(advantages, mask, self.grid.dp_group)
        return {"advantages": advantages, "returns": returns}

    def loss(self, batch, logprobs, values):
        policy, clipped, tokens = self.policy_loss(batch, logprobs)
        value = clipped_value_loss(values, batch["old_values"], batch["returns"], batch["response_mask"],
                                   self.cfg.rl.value_clip)
        return policy + self.cfg.rl.vf_coef * value, (policy, value, clipped, tokens)

    def after_iteration(self, record, rollout) -> dict:
        """The KL coefficient the next rollout uses (adaptive controller, or fixed)."""
        coef = self.kl_controller.update(record["kl"], self.cfg.rl.prompts_per_iter * self.cfg.rl.group_size)
        return {"kl_coef": coef}


class GRPOTrainer(PolicyTrainer):
    """No critic: each response's advantage is its score normalised within its prompt's group;
    the KL to the reference is a loss term (k3 estimator) weighted by rl.kl_coef."""

    loss_stat_names = ("policy_loss", "kl_loss", "clip_frac", "tokens")

    def advantages(self, rollout) -> dict:
        per_sequence = group_advantages(rollout["scores"], self.cfg.rl.group_size)
        return {"advantages": per_sequence.unsqueeze(1) * rollout["response_mask"]}

    def loss(self, batch, logprobs, values):
        policy, clipped, tokens = self.policy_loss(batch, logprobs)
        kl = (kl_k3(logprobs, batch["ref_logprobs"]) * batch["response_mask"]).sum()
        return policy + self.cfg.rl.kl_coef * kl, (policy, kl, clipped, tokens)
