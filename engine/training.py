"""The training loop: build the grid, model, optimizer and data, then step, log and evaluate."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from engine.batches import MockDataset, step_microbatches
from engine.config import Config
from engine.lr_schedule import LRScheduler
from engine.metrics import MetricsLogger, Throughput, device_peak_tflops, peak_memory_gib
from engine.optimizer import build_optimizer
from engine.precision import autocast_context, param_dtype, resolve_precision
from models.gpt import GPTModel
from parallel import comm
from parallel.grid import ProcessGrid, build_grid, init_distributed
from parallel.random import RNGTracker

CONSOLE_KEYS = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s", "mfu", "mem_gib")


def resolve_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    return cfg.train.device


def build_datasets(cfg: Config, grid: ProcessGrid):
    """(train, valid) datasets of token samples."""
    m = cfg.model
    if cfg.data.mock:
        return MockDataset(m.vocab_size, m.seq_length, cfg.train.seed, 0), MockDataset(m.vocab_size, m.seq_length, cfg.train.seed, 1)
    from engine.data_setup import build_text_datasets  # the indexed-dataset pipeline
    return build_text_datasets(cfg, grid)


class Trainer:
    """Everything a run needs to continue lives here (model, optimizer, scheduler, RNG, step)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        device = init_distributed(resolve_device(cfg), cfg.parallel.timeout_s)
        p = cfg.parallel
        self.grid = build_grid(p.tp, p.pp, p.cp, device)
        self.device = device
        self.rng = RNGTracker(device)
        self.rng.seed(cfg.train.seed, self.grid.tp_rank, self.grid.pp_rank)
        precision = resolve_precision(cfg.train.precision, device)
        self.model_chunks = [chunk.to(param_dtype(precision)) for chunk in self.build_model()]
        self.optimizer = build_optimizer(self.model_chunks, self.grid, cfg.train, device, cfg.optim)
        self.scheduler = LRScheduler(self.optimizer, cfg.train)
        self.autocast = autocast_context(precision, device)
        self.train_data, self.valid_data = build_datasets(cfg, self.grid)
        self.step = 0
        self.logger = MetricsLogger(cfg.train.output_dir, self.grid.is_logging_rank, cfg.log.quiet, cfg.log.tensorboard)
        if self.grid.is_logging_rank:
            with open(os.path.join(cfg.train.output_dir, "config.json"), "w") as handle:
                json.dump(dataclasses.asdict(cfg), handle, indent=1)

    def build_model(self) -> list:
        """This rank's model chunks (one without virtual pipeline stages)."""
        cfg = self.cfg
        model = GPTModel(cfg.model, self.grid.tp_group, self.rng, sequence_parallel=cfg.parallel.sp, device=self.device)
        model.init_weights(cfg.train.seed)
        return [model]

    @property
    def model(self):
        return self.model_chunks[0]

    # ---- one step -------------------------------------------------------------------------
    def microbatches(self, dataset, step: int) -> list:
        t = self.cfg.train
        return step_microbatches(dataset, step, t.global_batch_size, t.micro_batch_size,
                                 self.grid.dp_rank, self.grid.dp, self.device)

    def global_token_count(self, batches) -> torch.Tensor:
        count = sum(b["loss_mask"].sum() for b in batches).float()
        comm.all_reduce(count, self.grid.dp_group)
        return count

    def forward_backward(self, batches) -> torch.Tensor:
        """Accumulate grads of sum(token losses) / global token count; returns the local share
        of the mean loss (summing it over DP gives the global mean)."""
        total_tokens = self.global_token_count(batches)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            with self.autocast():
                token_loss = self.model(batch["tokens"], labels=batch["labels"])
            loss = (token_loss.float() * batch["loss_mask"]).sum() / total_tokens
            self.optimizer.scale_loss(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self) -> dict:
        for chunk in self.model_chunks:
            chunk.train()
        lr = self.scheduler.apply()
        self.optimizer.zero_grad()
        loss = self.forward_backward(self.microbatches(self.train_data, self.step))
        stats = self.optimizer.step()
        self.scheduler.advance()
        comm.all_reduce(loss, self.grid.dp_group)
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "lr": lr, **stats}

    @torch.no_grad()
    def evaluate(self) -> float:
        for chunk in self.model_chunks:
            chunk.eval()
        loss_sum = torch.zeros((), device=self.device)
        for index in range(self.cfg.train.eval_iters):
            batches = self.microbatches(self.valid_data, index)
            total = self.global_token_count(batches)
            for batch in batches:
                with self.autocast():
                    token_loss = self.model(batch["tokens"], labels=batch["labels"])
                loss_sum += (token_loss.float() * batch["loss_mask"]).sum() / total
        comm.all_reduce(loss_sum, self.grid.dp_group)
        return loss_sum.item() / self.cfg.train.eval_iters

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> list:
        cfg, history = self.cfg, []
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        meter = Throughput(tokens_per_step, cfg.model.flops_per_token(), self.grid.world_size,
                           device_peak_tflops(self.device, cfg.log.peak_tflops))
        while self.step < cfg.train.iters:
            record = self.train_step()
            _, tokens_per_s, mfu = meter.lap()
            record.update(tokens_per_s=tokens_per_s, mfu=mfu, mem_gib=peak_memory_gib(self.device))
            if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.iters):
                record["val_loss"] = self.evaluate()
                meter.lap()  # evaluation time is not training throughput
            history.append(record)
            if self.step % cfg.log.interval == 0 or "val_loss" in record or self.step == cfg.train.iters:
                self.logger.log(record, CONSOLE_KEYS + ("val_loss",))
        self.optimizer.finish_param_sync()  # the last step's weight all-gather may still run
        self.logger.close()
        return history


def gather_full_state(model, tp_group) -> dict:
    """Full (unsharded) parameters by name, gathered over TP; for tests and export."""
    return {name: p.shard_spec.gather(p.detach(), tp_group) for name, p in model.named_parameters()}


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
