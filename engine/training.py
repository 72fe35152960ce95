"""The training loop: build the grid, model, optimizer and data, then step, log and evaluate."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os

import torch
import torch.distributed as dist

from engine import background_save
from engine.batches import BatchRamp, MockDataset, collate, sample_microbatches, step_microbatches
from engine.checkpoint import load_checkpoint, load_pretrained, save_checkpoint, save_due
from engine.config import ADAPTER_METHODS, Config, ConfigError
from engine.launch import RunMonitor, inject_test_failure
from engine.lr_schedule import LRScheduler
from engine.metrics import MetricsLogger, Throughput, device_peak_tflops, peak_memory_gib
from engine.optimizer import build_optimizer
from engine.precision import autocast_context, param_dtype, resolve_precision
from engine.training_controls import EarlyStopper, SpikeGuard, apply_layer_lr_decay, freeze_parameters
from models import layer_graphs
from models.gpt import GPTModel
from models.pipeline_split import chunk_layer_ids, model_stage
from models.transformer import lora_aliases
from parallel import comm
from parallel.fp8 import FP8Recipe, enable_fp8
from parallel.te_fp8 import resolve_backend
from parallel.grid import ProcessGrid, build_grid, init_distributed
from parallel.lora import apply_lora
from parallel.nf4 import enable_nf4
from parallel.pipeline.embedding_sync import all_reduce_tied_embedding_grads, build_embedding_group
from parallel.pipeline.p2p import PipelineCommunicator
from parallel.pipeline.schedules import run_schedule
from parallel.pipeline.trace import build_tracer
from parallel.random import RNGTracker

RL_OBJECTIVES = ("reward", "ppo", "grpo")  # engine/rl/, docs/rl.md
CONSOLE_KEYS = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s", "mfu", "mem_gib")


def resolve_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    return cfg.train.device


def build_datasets(cfg: Config, grid: ProcessGrid):
    """(train, valid) datasets of token samples."""
    m = cfg.model
    if cfg.train.objective in RL_OBJECTIVES:
        from engine.rl.data import build_rl_datasets  # preference pairs or prompts
        return build_rl_datasets(cfg)
    if cfg.train.objective == "sft":
        from engine.sft_data import build_sft_datasets  # chat JSONL, rendered and packed
        return build_sft_datasets(cfg)
    if cfg.train.objective == "dpo":
        from engine.dpo_data import build_preference_datasets  # chosen / rejected pairs
        return build_preference_datasets(cfg)
    if cfg.data.mock:
        return MockDataset(m.vocab_size, m.seq_length, cfg.train.seed, 0), MockDataset(m.vocab_size, m.seq_length, cfg.train.seed, 1)
    from engine.data_setup import build_text_datasets  # the indexed-dataset pipeline
    return build_text_datasets(cfg, grid)


@dataclasses.dataclass
class PrefetchedBatches:
    """Micro-batches loaded ahead, with the samples they hold."""
    dataset: object
    first_sample: int
    global_batch: int
    batches: list

    def holds(self, dataset, first_sample: int, global_batch: int) -> bool:
        return self.dataset is dataset and (self.first_sample, self.global_batch) == (first_sample, global_batch)


class Trainer:
    """Everything a run needs to continue lives here (model, optimizer, scheduler, RNG, step)."""

    sequences_per_sample = 1  # sequences a data sample puts in the batch (DPO: chosen and rejected)
    console_keys = CONSOLE_KEYS + ("val_loss",)  # what each step prints; objectives add their own
    collate_batch = staticmethod(collate)  # samples -> one micro-batch of tensors

    def __init__(self, cfg: Config, monitor: RunMonitor | None = None):
        self.cfg = cfg
        self.monitor = monitor or RunMonitor()  # names the operation in flight if a collective fails
        self.monitor.operation = "process-group setup"
        device = init_distributed(resolve_device(cfg), cfg.parallel.timeout_s)
        p = cfg.parallel
        self.grid = build_grid(p.tp, p.pp, p.cp, device, p.timeout_s)
        self.monitor.where = f"rank {self.grid.rank} ({self.grid.coordinates()})"
        self.monitor.operation = "model, optimizer and data setup"
        self.device = device
        self.rng = RNGTracker(device)
        self.rng.seed(cfg.train.seed, self.grid.tp_rank, self.grid.pp_rank)
        self.model_chunks = self.build_model_chunks()
        self.prepare_finetune()
        self.frozen = freeze_parameters(self.model_chunks, cfg.train.freeze)  # before the optimizer takes the trainable ones
        apply_layer_lr_decay(self.model_chunks, cfg.optim.layer_lr_decay, cfg.model.num_layers)
        self.pipeline_tracer = build_tracer(cfg.log.pipeline_trace, self.grid.rank, device)
        self.pipeline_comm = self.build_pipeline_communicator()
        self.embedding_group = self.build_embedding_group()
        self.optimizer = build_optimizer(self.model_chunks, self.grid, cfg.train, device, cfg.optim)
        self.optimizer.pre_reduce_hooks.append(self.sync_tied_embedding_grads)
        self.scheduler = LRScheduler(self.optimizer, cfg.train)
        self.autocast = autocast_context(resolve_precision(cfg.train.precision, device), device)
        self.train_data, self.valid_data = build_datasets(cfg, self.grid)
        self.step = 0
        self.batch_ramp = BatchRamp(cfg.train.global_batch_size, cfg.train.batch_ramp)
        self.consumed_samples = 0  # training samples read so far (with a batch ramp, not step x global batch)
        self.prefetched_batches: PrefetchedBatches | None = None  # the next step's, loaded during this one
        self.spike_guard = SpikeGuard(cfg.train.spike_factor, cfg.train.spike_max_skips)
        self.early_stopper = EarlyStopper(cfg.train.early_stop_patience)
        self.logger = MetricsLogger(cfg.train.output_dir, self.grid.is_logging_rank, cfg.log.quiet, cfg.log.tensorboard)
        if self.grid.is_logging_rank:
            with open(os.path.join(cfg.train.output_dir, "config.json"), "w") as handle:
                json.dump(dataclasses.asdict(cfg), handle, indent=1)
        self.load_initial_checkpoint()

    def load_initial_checkpoint(self) -> None:
        c = self.cfg.checkpoint
        if c.load:
            load_checkpoint(self, c.load, c.load_step, c.load_model_only)

    def build_model_chunks(self) -> list:
        """build_model's chunks in the parameter dtype of train.precision (FP8 linears for fp8)."""
        precision = resolve_precision(self.cfg.train.precision, self.device)
        chunks = self.build_model(param_dtype(precision))
        self.fp8_backend = None  # te or trellis: whose FP8 linears (parallel/te_fp8.py), where precision is fp8
        if precision == "fp8":
            t, m = self.cfg.train, self.cfg.model
            recipe = FP8Recipe.from_names(t.fp8_format, t.fp8_scaling, t.fp8_amax_history)
            self.fp8_backend = resolve_backend(t.fp8_backend, recipe, self.device, m.compile, m.cuda_graphs)
            for chunk in chunks:
                enable_fp8(chunk, recipe, self.fp8_backend)
        return chunks

    def build_model(self, dtype=torch.float32) -> list:
        """This rank's model chunks, one per virtual pipeline stage: chunk c is model stage
        c * pp + pp_rank; the first model stage embeds, the last computes the loss. Built in
        `dtype` directly (the fp32 init values rounded once, as a later cast would)."""
        cfg, grid = self.cfg, self.grid
        pp, vpp = cfg.parallel.pp, cfg.parallel.vpp
        chunks = []
        for chunk in range(vpp):
            stage = model_stage(grid.pp_rank, chunk, pp)
            layer_ids = chunk_layer_ids(cfg.model.num_layers, pp, vpp, grid.pp_rank, chunk, cfg.parallel.pipeline_layers)
            model = GPTModel(cfg.model, grid.tp_group, self.rng, layer_ids=layer_ids, pre_process=stage == 0,
                             post_process=stage == pp * vpp - 1, sequence_parallel=cfg.parallel.sp, device=self.device,
                             dtype=dtype)
            model.init_weights(cfg.train.seed)
            if cfg.model.tie_embeddings and hasattr(model, "output_weight"):
                # The last stage's copy of the embedding: counted once (on the first stage) in the grad norm.
                model.output_weight.tied_embedding_copy = True
                model.output_weight.defer_grad_reduce = True
            if cfg.model.tie_embeddings and pp > 1 and model.pre_process:
                model.embedding.weight.defer_grad_reduce = True  # summed with the last stage's copy first
            chunks.append(model)
        return chunks

    def prepare_finetune(self) -> None:
        """The pretrained weights (finetune.base) first: QLoRA quantises the full-precision
        values. Then QLoRA's NF4 bases, and LoRA's adapters on top (they call the NF4 linear as
        their base product); apply_lora freezes everything else."""
        f = self.cfg.finetune
        self.adapted_modules, self.quantized_linears = [], 0
        if f.base:
            load_pretrained(self, f.base)
        if f.method not in ADAPTER_METHODS:
            return
        for chunk in self.model_chunks:
            if f.method == "qlora":
                self.quantized_linears += enable_nf4(chunk, f.qlora_targets, f.qlora_double_quant)
            self.adapted_modules += apply_lora(
                chunk, f.lora_targets, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_rslora,
                seed=self.cfg.train.seed, aliases=lora_aliases(self.cfg.model), rng=self.rng)
        self.check_finetune_targets()

    def check_finetune_targets(self) -> None:
        """A target list that matches no linear on any pipeline stage is a user error."""
        f = self.cfg.finetune
        counts = torch.tensor([float(len(self.adapted_modules)), float(self.quantized_linears)], device=self.device)
        comm.all_reduce(counts, self.grid.pp_group)
        if counts[0].item() == 0:
            raise ConfigError(f"finetune.lora_targets {f.lora_targets} match no linear layer; "
                             "use patterns such as layers.*.attn.qkv or aliases q k v o gate up down")
        if f.method == "qlora" and counts[1].item() == 0:
            raise ConfigError(f"finetune.qlora_targets {f.qlora_targets} match no linear layer; "
                             "use * or patterns such as layers.*.mlp.*")

    def build_pipeline_communicator(self):
        if self.grid.pp == 1:
            return None
        cfg = self.cfg
        seq = cfg.model.seq_length
        if cfg.parallel.sp and self.grid.tp > 1:
            seq //= self.grid.tp
        shape = (seq, self.sequences_per_microbatch(), cfg.model.hidden_size)
        dtype = next(self.model_chunks[0].parameters()).dtype
        return PipelineCommunicator(self.grid.pp_group, self.grid.pp_rank, shape, dtype, self.device,
                                    self.pipeline_tracer)

    def tokens_per_step(self) -> int:
        """Tokens trained on per step (at the full global batch), for the logged tokens/s and MFU."""
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length * self.sequences_per_sample

    def tokens_in_step(self, record: dict) -> int:
        """Tokens the step of `record` trained on: fewer while the batch ramps up."""
        if "global_batch" not in record:
            return self.tokens_per_step()
        return record["global_batch"] * self.cfg.model.seq_length * self.sequences_per_sample

    def sequences_per_microbatch(self) -> int:
        """Batch size of the activations that travel between pipeline stages."""
        return self.cfg.train.micro_batch_size * self.sequences_per_sample

    def build_embedding_group(self):
        """Megatron's embedding group (first and last stage of each pipeline), for tied embeddings."""
        if self.grid.pp == 1 or not self.cfg.model.tie_embeddings:
            return None
        pipelines = self.grid.mesh.mesh.reshape(self.grid.pp, -1).t().tolist()
        return build_embedding_group(pipelines, self.grid.rank, datetime.timedelta(seconds=self.cfg.parallel.timeout_s))

    def tied_embedding_params(self) -> list:
        first, last = self.model_chunks[0], self.model_chunks[-1]
        params = [first.embedding.weight] if first.pre_process else []
        params = params + ([last.output_weight] if last.post_process else [])
        return [p for p in params if p.requires_grad]  # a frozen embedding (LoRA) has no gradient

    def sync_tied_embedding_grads(self) -> None:
        """After backward, before the optimizer: both embedding copies get the summed gradient."""
        if self.embedding_group is not None:
            all_reduce_tied_embedding_grads(self.tied_embedding_params(), self.embedding_group)

    @property
    def model(self):
        return self.model_chunks[0]

    # ---- one step -------------------------------------------------------------------------
    def microbatches(self, dataset, step: int) -> list:
        t = self.cfg.train
        return step_microbatches(dataset, step, t.global_batch_size, t.micro_batch_size,
                                 self.grid.dp_rank, self.grid.dp, self.device, self.collate_batch)

    def train_microbatches(self, global_batch: int) -> list:
        """This rank's share of the next `global_batch` training samples: those the previous
        step prepared (prefetch_next_microbatches) when they are these, else loaded now."""
        prefetched, self.prefetched_batches = self.prefetched_batches, None
        if prefetched is not None and prefetched.holds(self.train_data, self.consumed_samples, global_batch):
            return prefetched.batches
        t = self.cfg.train
        return sample_microbatches(self.train_data, self.consumed_samples, global_batch, t.micro_batch_size,
                                   self.grid.dp_rank, self.grid.dp, self.device, self.collate_batch)

    def prefetch_next_microbatches(self) -> None:
        """Load and collate the next step's micro-batches, and queue their copies to the GPU, while
        this step's backward still runs there. Loaded at the start of a step instead, they kept
        the GPU idle for the host's collation (about 1% of a llama-1.3b step on an H200, profile).
        Kept with the samples they hold, so a resumed or reconfigured run never takes stale ones."""
        if self.step + 1 >= self.cfg.train.iters:
            return  # the last step: nothing follows it
        self.monitor.operation = f"loading the batches of step {self.step + 2} (prefetch)"
        global_batch = self.batch_ramp.batch_at(self.consumed_samples)
        try:
            batches = self.train_microbatches(global_batch)
        except Exception:  # noqa: BLE001 - bad data, end of data: the next step loads again and reports it
            return
        self.prefetched_batches = PrefetchedBatches(self.train_data, self.consumed_samples, global_batch, batches)

    def global_token_count(self, batches) -> torch.Tensor:
        count = sum(b["loss_mask"].sum() for b in batches).float()
        comm.all_reduce(count, self.grid.dp_group)
        return count

    def forward_step_fn(self, batches, total_tokens):
        """The schedule's callback: run one chunk on one microbatch. The last model stage returns
        that microbatch's summed token loss / global token count; other stages their hidden state."""
        def forward_step(chunk_index: int, microbatch: int, input_tensor):
            model, batch = self.model_chunks[chunk_index], batches[microbatch]
            # Packed samples: every stage needs the per-document positions (RoPE is applied in
            # each layer) and document ids (attention stays inside a document).
            packing = {key: batch.get(key) for key in ("position_ids", "document_ids")}
            with self.autocast():
                if not model.post_process:
                    output = model(batch["tokens"] if model.pre_process else None, hidden=input_tensor, **packing)
                    return output.to(self.pipeline_comm.dtype)  # what the next stage expects to receive
                return model(batch["tokens"] if model.pre_process else None, hidden=input_tensor,
                             labels=batch["labels"], loss_weights=batch["loss_mask"] / total_tokens,
                             loss_grad=self.optimizer.loss_grad, **packing)
        return forward_step

    def run_pipeline(self, batches, forward_only: bool) -> torch.Tensor:
        """Run the schedule; returns this rank's share of the mean loss (summing it over DP
        gives the global mean), sent from the last pipeline stage to every stage."""
        total_tokens = self.global_token_count(batches)
        return self.run_loss_schedule(self.forward_step_fn(batches, total_tokens), len(batches), forward_only)

    def run_loss_schedule(self, forward_step, num_microbatches: int, forward_only: bool) -> torch.Tensor:
        """Run the schedule over `forward_step`, whose last-stage outputs are scalar losses; returns
        their sum on every pipeline stage."""
        result = run_schedule(forward_step, num_microbatches, len(self.model_chunks), self.pipeline_comm,
                              self.optimizer.scale_loss, forward_only, self.pipeline_tracer)
        self.last_schedule_stats = result.stats
        loss = torch.stack(result.losses).sum() if result.losses else torch.zeros((), device=self.device)
        return self.broadcast_from_last_stage(loss)

    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.grid.pp > 1:
            torch.distributed.broadcast(tensor, self.grid.pp_global_rank(self.grid.pp - 1), group=self.grid.pp_group)
        return tensor

    def forward_backward(self, batches) -> torch.Tensor:
        """Accumulate grads of sum(token losses) / global token count over the pipeline."""
        return self.run_pipeline(batches, forward_only=False)

    def train_step(self) -> dict:
        for chunk in self.model_chunks:
            chunk.train()
        self.monitor.operation = f"step {self.step + 1} forward-backward (pipeline and gradient reduction)"
        inject_test_failure(self.grid.rank, self.step + 1)
        lr = self.scheduler.apply()
        self.optimizer.zero_grad()
        global_batch = self.batch_ramp.batch_at(self.consumed_samples)
        batches = self.train_microbatches(global_batch)
        self.optimizer.set_microbatches(len(batches))  # fewer while the batch ramps up
        loss = self.forward_backward(batches)
        self.consumed_samples += global_batch
        self.prefetch_next_microbatches()
        self.monitor.operation = f"step {self.step + 1} loss all-reduce over data-parallel ranks"
        comm.all_reduce(loss, self.grid.dp_group)  # the global loss: every rank takes the same decision below
        # Only an active guard reads the loss here: the read waits for the backward to finish.
        if self.spike_guard.enabled and self.spike_guard.should_skip(loss.item(), self.step + 1):
            # The batch is consumed but changes nothing: no update, no LR-schedule step.
            self.optimizer.discard_grads()
            self.step += 1
            return {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": float("nan"), "spike_skipped": True,
                    "global_batch": global_batch}
        self.monitor.operation = f"step {self.step + 1} optimizer step (gradient reduction, norm, weight gather)"
        stats = self.optimizer.step()
        self.scheduler.advance(global_batch)
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "lr": lr, "global_batch": global_batch, **stats}

    @torch.no_grad()
    def evaluate(self) -> float:
        for chunk in self.model_chunks:
            chunk.eval()
        self.monitor.operation = f"evaluation after step {self.step}"
        loss_sum = torch.zeros((), device=self.device)
        for index in range(self.cfg.train.eval_iters):
            loss_sum += self.run_pipeline(self.microbatches(self.valid_data, index), forward_only=True)
        comm.all_reduce(loss_sum, self.grid.dp_group)
        return loss_sum.item() / self.cfg.train.eval_iters

    def validation_record(self) -> dict:
        """What an evaluation adds to the step's record."""
        return {"val_loss": self.evaluate()}

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> list:
        cfg, history = self.cfg, []
        meter = Throughput(self.tokens_per_step(), cfg.model.flops_per_token(), self.grid.world_size,
                           device_peak_tflops(self.device, cfg.log.peak_tflops))
        if cfg.train.eval_at_start and self.valid_data is not None:
            self.logger.log({"step": self.step, **self.validation_record()}, self.console_keys)
            meter.lap()
        while self.step < cfg.train.iters:
            record = self.train_step()
            _, tokens_per_s, mfu = meter.lap(self.tokens_in_step(record))
            record.update(tokens_per_s=tokens_per_s, mfu=mfu, mem_gib=peak_memory_gib(self.device))
            if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.iters):
                record.update(self.validation_record())
                meter.lap()  # evaluation time is not training throughput
                record["early_stop"] = self.early_stopper.should_stop(record["val_loss"])
            history.append(record)
            to_console = self.step % cfg.log.interval == 0 or "val_loss" in record or self.step == cfg.train.iters
            self.logger.log(record, self.console_keys, to_console)
            if save_due(cfg.checkpoint, self.step, final=self.step == cfg.train.iters):
                self.monitor.operation = f"checkpoint save at step {self.step}"
                self.optimizer.finish_param_sync()  # weights must be complete before they are saved
                save_checkpoint(self, cfg.checkpoint.save, cfg.checkpoint.keep, cfg.checkpoint.async_save)
            if record.get("early_stop"):
                self.stop_early()
                break
        self.optimizer.finish_param_sync()  # the last step's weight all-gather may still run
        if background_save.in_flight():
            self.monitor.operation = "background checkpoint save"
            background_save.wait_for_pending()  # the run's last checkpoint is complete when train returns
        self.logger.close()
        self.pipeline_tracer.save()
        return history

    def stop_early(self) -> None:
        """Validation stopped improving: say so, and keep the weights of this step."""
        patience = self.cfg.train.early_stop_patience
        if self.grid.is_logging_rank:
            print(f"early stop at step {self.step}: val_loss has not improved on {self.early_stopper.best:.4f} "
                  f"for {patience} evaluations (train.early_stop_patience)", flush=True)
        if self.cfg.checkpoint.save and not save_due(self.cfg.checkpoint, self.step, final=False):
            self.optimizer.finish_param_sync()
            save_checkpoint(self, self.cfg.checkpoint.save, self.cfg.checkpoint.keep, self.cfg.checkpoint.async_save)


def trainer_class(objective: str):
    """The Trainer of an objective: LM and SFT share this one, DPO / reward / PPO / GRPO have theirs."""
    if objective == "dpo":
        from engine.dpo import DPOTrainer
        return DPOTrainer
    if objective in RL_OBJECTIVES:
        from engine.rl.trainers import rl_trainer_class
        return rl_trainer_class(objective)
    return Trainer


def gather_full_state(model, tp_group) -> dict:
    """Full (unsharded) parameters by name, gathered over TP; for tests and export."""
    return {name: p.shard_spec.gather(p.detach(), tp_group) for name, p in model.named_parameters()}


def gather_model_state(model_chunks, grid) -> dict:
    """Full parameters of the whole model by name on every rank, gathered over TP and PP. A
    tied embedding's last-stage copy is left out, as the serial model has no such parameter."""
    local = {}
    for chunk in model_chunks:
        local.update(gather_full_state(chunk, grid.tp_group))
    if grid.pp == 1:
        return local
    tied_copy = any(getattr(p, "tied_embedding_copy", False) for c in model_chunks for p in c.parameters())
    if tied_copy:
        local.pop("output_weight")
    stages = [None] * grid.pp
    torch.distributed.all_gather_object(stages, {k: v.cpu() for k, v in local.items()}, group=grid.pp_group)
    return {name: tensor for stage in stages for name, tensor in stage.items()}


def shutdown() -> None:
    background_save.wait_for_pending()  # its write coordinates over a group destroyed below
    layer_graphs.release_all()  # NCCL hangs destroying a communicator that a live CUDA graph captured
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
