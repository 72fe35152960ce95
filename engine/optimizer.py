"""The optimizer step: data-parallel gradient reduction, mixed precision, loss scaling,
global-norm clipping and the update, optionally sharded over data-parallel ranks.

The loop only calls `zero_grad`, `scale_loss`, `step` and the state pairs. Underneath
(docs/optimizer.md): each model chunk's parameters live in a `GradBuffer` (flat weights, flat
fp32 main_grad, buckets reduced from backward hooks); each rank optimizes the `Piece`s of its
shard (all of it without sharding) through a torch optimizer on fp32 tensors: master copies
for bf16/fp16 weights, the weights themselves for fp32.
"""
from __future__ import annotations

import math

import torch

from engine.config import OptimConfig
from engine.flat_adamw import FlatAdamW, use_flat_adamw
from engine.galore import GaLoreAdamW, galore_options
from engine.lion import Lion
from engine.loss_scaler import DynamicLossScaler
from engine.precision import param_dtype, resolve_precision
from parallel.distributed_optimizer import copy_masters_to_model, gather_state_by_name, load_state_by_name, owned_pieces
from parallel.fp8 import clear_weight_cache
from parallel.grad_buffer import GradBuffer
from parallel.gradients import clip_coefficient, global_grad_norm, is_counted_on_this_rank, reduce_sequence_parallel_grads

# Per-element state of each optimizer (what param_state_by_name gathers over DP).
# GaLore's projected weights are excluded here: their state is per TP shard (rank_local_state).
ELEMENT_STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",), "sgd": ("momentum_buffer",),
                      "adafactor": (), "galore_adamw": ("exp_avg", "exp_avg_sq")}
STEP_COUNTED = ("adamw", "adafactor", "galore_adamw")  # a per-tensor "step" is kept for these


def is_decayed(name: str, param) -> bool:
    """Weight decay applies to matrices (linears, embeddings), never to norms or biases."""
    return param.dim() >= 2 and "norm" not in name


def param_groups(pieces, weight_decay: float, options_of=None) -> list:
    """Pieces grouped by their options: weight decay (matrices only), the parameter's
    `lr_scale` (layer-wise LR decay, applied by the LR scheduler) and whatever `options_of(piece)`
    adds (GaLore's projection)."""
    groups = {}
    for decayed in (True, False):  # decayed groups first
        for piece in pieces:
            if is_decayed(piece.name, piece.param) != decayed:
                continue
            options = {"weight_decay": weight_decay if decayed else 0.0}
            if hasattr(piece.param, "lr_scale"):
                options["lr_scale"] = piece.param.lr_scale
            options.update(options_of(piece) if options_of else {})
            groups.setdefault(tuple(sorted(options.items())), {"params": [], **options})["params"].append(piece.main)
    return list(groups.values())


def build_torch_optimizer(groups, train_cfg, optim_cfg: OptimConfig, device: torch.device):
    """The inner optimizer over fp32 tensors; fused CUDA kernels or foreach where torch has them."""
    fast_path = {"fused": True} if device.type == "cuda" else {"foreach": True}
    betas = (train_cfg.adam_beta1, train_cfg.adam_beta2)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.adam_eps, **fast_path)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=optim_cfg.momentum, foreach=True)
    if optim_cfg.name == "lion":
        return Lion(groups, lr=train_cfg.lr, betas=betas)
    if optim_cfg.name == "galore_adamw":
        return GaLoreAdamW(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.adam_eps,
                           update_interval=optim_cfg.galore_update_interval, scale=optim_cfg.galore_scale)
    return torch.optim.Adafactor(groups, lr=train_cfg.lr, foreach=True)


class TrainingOptimizer:
    def __init__(self, model_chunks, grid, train_cfg, device, optim_cfg: OptimConfig):
        self.grid, self.cfg, self.optim_cfg, self.device = grid, train_cfg, optim_cfg, device
        self.precision = resolve_precision(train_cfg.precision, device)
        self.sharded = optim_cfg.shard and grid.dp > 1
        microbatches = train_cfg.global_batch_size // (train_cfg.micro_batch_size * grid.dp)
        bucket_numel = max(1, int(optim_cfg.bucket_mb * 2**20 / 4))
        self.named_by_chunk = [[(n, p) for n, p in chunk.named_parameters() if p.requires_grad] for chunk in model_chunks]
        self.buffers = [GradBuffer(named, grid.dp_group, bucket_numel, optim_cfg.shard, optim_cfg.overlap_grad_reduce,
                                   microbatches) for named in self.named_by_chunk]
        owned = [owned_pieces(buffer) for buffer in self.buffers]
        self.pieces_by_buffer = [pieces for pieces, _ in owned]
        self.master_shards = [shard for _, shards in owned for shard in shards]
        self.pieces = [piece for pieces in self.pieces_by_buffer for piece in pieces]
        self.params = [p for named in self.named_by_chunk for _, p in named]
        options_of = galore_options(optim_cfg) if optim_cfg.name == "galore_adamw" else None
        groups = param_groups(self.pieces, train_cfg.weight_decay, options_of)
        self.inner = build_torch_optimizer(groups, train_cfg, optim_cfg, device)
        # One pass per run of pieces that also writes the 16-bit weights (engine/flat_adamw.py);
        # the torch AdamW then only holds the param groups and the state the checkpoints read.
        use_flat = use_flat_adamw(optim_cfg.flat_adamw, optim_cfg.name, device, self.pieces)
        self.flat = FlatAdamW(self.inner, self.master_shards) if use_flat else None
        self.scaler = None
        if self.precision == "fp16":
            o = optim_cfg
            self.scaler = DynamicLossScaler(o.initial_scale, o.min_scale, o.growth_interval, o.hysteresis)
        self.steps_taken = 0  # successful (not skipped) updates
        self.pre_reduce_hooks = []  # run on the accumulated local grads, before any DP reduction
        if optim_cfg.overlap_param_gather:
            self._wait_for_params_before_forward(model_chunks)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for buffer in self.buffers:
            buffer.zero_grad()

    def set_microbatches(self, count: int) -> None:
        """Backward passes in the coming step (changes during a batch ramp-up)."""
        for buffer in self.buffers:
            buffer.set_microbatches(count)

    def discard_grads(self) -> None:
        """Drop this step's gradients without an update (loss-spike guard). Reductions the
        backward hooks started are completed first, so every rank's collectives stay in step."""
        for buffer in self.buffers:
            buffer.finish_grad_reduce()
        self.zero_grad()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler else loss

    @property
    def loss_grad(self) -> float:
        """The gradient the backward of `scale_loss(loss)` gives the loss."""
        return self.scaler.scale if self.scaler else 1.0

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> dict:
        """Reduce, unscale, check, clip and apply the gradients; returns what the log reports."""
        clear_weight_cache()  # FP8 weight copies live for one step (parallel/fp8.py); not needed past the backward
        self.finish_param_sync()
        for hook in self.pre_reduce_hooks:
            hook()  # e.g. the tied-embedding sum across pipeline stages, on local grads
        for buffer in self.buffers:
            buffer.finish_grad_reduce()
        reduce_sequence_parallel_grads(self.params, self.grid.tp_group)
        grads = [piece.main.grad for piece in self.pieces]
        if self.scaler and grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        grad_norm = self.grad_norm()
        stats = {"grad_norm": grad_norm.item(), "optim_state_bytes": self.state_bytes()}
        if self.scaler:
            skip = not math.isfinite(stats["grad_norm"])  # an inf/nan anywhere makes the global norm inf/nan
            self.scaler.update(skip)
            stats.update(loss_scale=self.scaler.scale, skipped=skip, skipped_steps=self.scaler.skipped_steps)
            if skip:
                return stats
        coef = clip_coefficient(self.cfg.clip_grad, grad_norm) if grads else None
        stats["clipped"] = coef is not None
        self.apply_update(grads, coef)
        self.steps_taken += 1
        if self.flat is None:  # the flat AdamW wrote the model weights in its pass
            copy_masters_to_model(self.master_shards)
        for buffer in self.buffers:
            buffer.launch_param_gather()
        if not self.optim_cfg.overlap_param_gather:
            self.finish_param_sync()
        return stats

    def apply_update(self, grads, clip_coef) -> None:
        """The inner step on gradients scaled by clip_coef (None: unscaled). The flat AdamW and
        torch's fused Adam/AdamW scale each gradient inside their kernels (torch's divides by
        `grad_scale`), which saves a pass over all fp32 gradients; other optimizers get the
        scaling as its own pass."""
        fused_adam = isinstance(self.inner, (torch.optim.Adam, torch.optim.AdamW)) and self.inner.defaults.get("fused")
        if self.flat is not None:
            self.flat.step(clip_coef)
        elif clip_coef is None:
            self.inner.step()
        elif fused_adam:
            self.inner.grad_scale = clip_coef.reciprocal()
            try:
                self.inner.step()
            finally:
                del self.inner.grad_scale
        else:
            torch._foreach_mul_(grads, clip_coef)
            self.inner.step()

    def grad_norm(self) -> torch.Tensor:
        """Each element once: this rank's pieces (its DP shard when sharded), TP-replicated
        parameters from TP rank 0 only; summed over TP and PP (and DP when sharded)."""
        tp_rank = self.grid.tp_rank
        grads = [p.main.grad for p in self.pieces if is_counted_on_this_rank(p.param, tp_rank)]
        groups = [self.grid.tp_group, self.grid.pp_group] + ([self.grid.dp_group] if self.sharded else [])
        return global_grad_norm(grads, groups, self.device)

    def state_bytes(self) -> int:
        """Optimizer state plus fp32 master copies held by this rank."""
        return self.inner_state_bytes() + sum(p.main.nbytes for p in self.pieces if p.has_master)

    def inner_state_bytes(self) -> int:
        """Bytes of the optimizer's own state on this rank (moments, GaLore bases; not masters)."""
        return sum(v.nbytes for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v))

    # ---- overlapped parameter all-gather -------------------------------------------------
    def _wait_for_params_before_forward(self, model_chunks) -> None:
        """Each module waits only for the buckets holding its own parameters, so the gathers of
        later layers overlap the forward of earlier ones."""
        for chunk, buffer in zip(model_chunks, self.buffers):
            for module in chunk.modules():
                own = [p for p in module.parameters(recurse=False) if p in buffer.offsets]
                if own:
                    buckets = list({b.index: b for b in map(buffer.bucket_of, own)}.values())
                    module.register_forward_pre_hook(lambda _m, _a, b=buffer, bs=buckets: b.wait_param_gather(bs))

    def finish_param_sync(self) -> None:
        """Wait for outstanding weight all-gathers (before reading or saving the weights)."""
        for buffer in self.buffers:
            buffer.wait_param_gather()

    # ---- state -----------------------------------------------------------------------------
    def param_state_by_name(self) -> dict:
        """{param name: {"exp_avg": ..., "master": ...}} at the parameter's local (TP) shape,
        complete over DP, plus "__step__" and (fp16) "__loss_scaler__"."""
        self.finish_param_sync()
        keys = ELEMENT_STATE_KEYS[self.optim_cfg.name] if self.steps_taken else ()
        if self.optim_cfg.name == "sgd" and not self.optim_cfg.momentum:
            keys = ()
        with_master = param_dtype(self.precision) != torch.float32
        dp_group = self.grid.dp_group if self.sharded else None
        state = {}
        for named, pieces in zip(self.named_by_chunk, self.pieces_by_buffer):
            named, pieces = self.layout_free(named, pieces)
            state.update(gather_state_by_name(named, pieces, self.inner.state, keys, with_master, dp_group))
        state["__step__"] = self.steps_taken
        if self.scaler:
            state["__loss_scaler__"] = self.scaler.state_dict()
        return state

    def load_param_state_by_name(self, state: dict) -> None:
        """Load the structure param_state_by_name returns, keeping this rank's DP shard. Load
        the model weights first: parameters without a saved "master" take theirs from them."""
        self.steps_taken = int(state.get("__step__", 0))
        if self.scaler and "__loss_scaler__" in state:
            self.scaler.load_state_dict(state["__loss_scaler__"])
        step_state = None
        if self.optim_cfg.name in STEP_COUNTED and self.steps_taken:
            fused = self.inner.defaults.get("fused")
            step_state = lambda piece: torch.tensor(float(self.steps_taken), dtype=torch.float32,
                                                    device=piece.main.device if fused else "cpu")
        for piece in self.pieces:
            if piece.has_master:
                piece.main.copy_(piece.model_view())
        by_name = {k: v for k, v in state.items() if not k.startswith("__")}
        for named, pieces in zip(self.named_by_chunk, self.pieces_by_buffer):
            load_state_by_name(self.layout_free(named, pieces)[1], self.inner.state, by_name, step_state)
        self.adopt_loaded_state()

    # ---- state that belongs to one TP shard (GaLore's projections) --------------------------
    def piece_names(self) -> dict:
        return {id(piece.main): piece.name for piece in self.pieces}

    def layout_free(self, named, pieces) -> tuple:
        """(named, pieces) without the parameters whose state is rank-local."""
        local = {id(p) for p in getattr(self.inner, "projected_params", list)()}
        local_names = {piece.name for piece in pieces if id(piece.main) in local}
        return [(n, p) for n, p in named if n not in local_names], [p for p in pieces if p.name not in local_names]

    def rank_local_state(self) -> dict:
        """{"<param name>.<state>": tensor} of state kept in a basis of this rank's shard (GaLore's
        projected moments and bases): meaningful only at the same TP layout."""
        projected_state = getattr(self.inner, "projected_state", None)
        return projected_state(self.piece_names()) if projected_state else {}

    def load_rank_local_state(self, tensors: dict) -> int:
        """Restore what rank_local_state returned; returns how many parameters got it back."""
        load = getattr(self.inner, "load_projected_state", None)
        return load(self.piece_names(), tensors, self.steps_taken) if load else 0

    def has_rank_local_state(self) -> bool:
        return bool(getattr(self.inner, "projected_params", list)())

    def state_dict(self) -> dict:
        """This rank's own state (its shard when sharded), for same-layout resumes."""
        self.finish_param_sync()
        return {"inner": self.inner.state_dict(), "masters": [p.main for p in self.pieces if p.has_master],
                "steps_taken": self.steps_taken, "loss_scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        for piece, master in zip([p for p in self.pieces if p.has_master], state["masters"]):
            piece.main.copy_(master)
        self.steps_taken = int(state["steps_taken"])
        if self.scaler and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        self.adopt_loaded_state()

    def adopt_loaded_state(self) -> None:
        """A load replaced the inner optimizer's state tensors: the flat AdamW takes them back."""
        if self.flat is not None:
            self.flat.adopt_state()


def build_optimizer(model_chunks, grid, train_cfg, device, optim_cfg: OptimConfig | None = None) -> TrainingOptimizer:
    return TrainingOptimizer(model_chunks, grid, train_cfg, device, optim_cfg or OptimConfig())
