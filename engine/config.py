"""The run's configuration: a dataclass tree loaded from YAML, overridden from the command line
(`--train.lr 3e-4` or `train.lr=3e-4`) and validated before any process group exists."""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing

import torch
import yaml

from engine.launch import UserError
from engine.precision import FP8_BACKENDS, PRECISIONS
from engine.rl.config import RLConfig, validate_rl
from models.config import ModelConfig, resolve_preset, validate_model
from models.pipeline_split import balanced_layer_counts, stage_layer_counts
from parallel.grid import GridError, check_layout


OPTIMIZERS = ("adamw", "lion", "sgd", "adafactor", "galore_adamw")


class ConfigError(UserError):
    """A bad configuration value; its message is one sentence naming the key."""


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    cp: int = 1
    sp: bool = False  # sequence parallelism (needs tp > 1 to have an effect)
    pipeline_layers: str = ""  # per-stage layer counts ("3,2,2"), or "auto": fewer on the output layer's rank
    timeout_s: float = 600.0  # collective timeout


@dataclasses.dataclass
class TrainConfig:
    iters: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 0  # 0: micro_batch_size x data-parallel size
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_iters: int = 0
    decay_iters: int = 0  # 0: train.iters
    wsd_decay_fraction: float = 0.1  # WSD: final fraction of decay_iters spent decaying
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    seed: int = 1234
    output_dir: str = "runs/default"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | bf16-autocast | fp16 | fp8 (engine/precision.py)
    device: str = "auto"  # auto | cpu | cuda
    # FP8 recipe (train.precision fp8; parallel/fp8.py): gradient format, scaling granularity,
    # and the amax history of tensor scaling (1: the current amax each step).
    fp8_format: str = "hybrid"  # hybrid (e4m3 forward, e5m2 gradients) | e4m3 (e4m3 everywhere)
    fp8_scaling: str = "tensor"  # tensor (one scale per tensor) | row (one scale per row of each GEMM operand)
    fp8_amax_history: int = 1
    fp8_backend: str = "auto"  # auto (Transformer Engine where installed and able to run the recipe) | te | trellis (parallel/te_fp8.py)
    eval_interval: int = 0  # 0: no validation
    eval_iters: int = 2
    eval_at_start: bool = False  # also evaluate before the first step (a fine-tune's base loss)
    objective: str = "lm"  # lm (data.path) | sft (data.sft_train, docs/finetuning.md) | dpo (docs/preference.md) | reward | ppo | grpo (docs/rl.md)
    freeze: typing.List[str] = dataclasses.field(default_factory=list)  # fnmatch patterns of parameter names not trained
    early_stop_patience: int = 0  # stop after this many evaluations without a new best val_loss (0: off)
    spike_factor: float = 0.0  # skip a step whose loss exceeds this x the running mean of recent losses (0: off)
    spike_max_skips: int = 3  # stop the run after this many spike-skipped steps in a row
    # Batch-size ramp-up (Megatron's --rampup-batch-size): start increment samples; the global batch
    # grows from start by increment, reaching global_batch_size after `samples` consumed samples.
    batch_ramp: typing.List[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DataConfig:
    mock: bool = False  # random-token source (benchmarks, tests)
    path: typing.List[str] = dataclasses.field(default_factory=list)  # dataset prefixes, optional weights first
    split: str = "969,30,1"
    tokenizer_type: str = "sentencepiece"
    tokenizer: str = ""
    cache_dir: str = ""
    sft_train: str = ""  # SFT chat JSONL for training (train.objective sft)
    sft_valid: str = ""  # SFT chat JSONL for validation ("" = no validation data)
    sft_packing: bool = True  # pack several conversations into one sequence (attention stays per conversation)
    preference_train: str = ""  # preference-pair JSONL (prompt / chosen / rejected) for train.objective dpo
    preference_valid: str = ""  # preference pairs for validation ("" = no validation data)
    preference_format: str = "chat"  # chat (chat template) | text (prompt + response + EOD)


@dataclasses.dataclass
class LogConfig:
    interval: int = 1
    peak_tflops: float = 0.0  # 0: from the device name (989 for H100/H200 bf16), unknown on CPU
    tensorboard: bool = False
    quiet: bool = False
    pipeline_trace: str = ""  # Chrome-trace JSON of the pipeline schedule, one file per rank ('' = off)


@dataclasses.dataclass
class CheckpointConfig:
    save: str = ""  # directory to save into ("" = never save)
    interval: int = 0  # save every N steps (0: only at the end of training)
    keep: int = 0  # keep the newest K checkpoints (0: keep all)
    load: str = ""  # directory (or one step's directory) to resume from
    load_step: int = -1  # step to load; 0 or -1: the latest
    load_model_only: bool = False  # take only the weights (start a fine-tune at step 0 with a fresh optimizer)
    async_save: bool = False  # copy the state to host memory and write it while training goes on


@dataclasses.dataclass
class OptimConfig:
    """The optimizer, its data-parallel sharding and fp16 loss scaling (docs/optimizer.md)."""
    name: str = "adamw"  # adamw | lion | sgd | adafactor | galore_adamw (betas from train.adam_beta1/2)
    shard: bool = False  # distributed optimizer: fp32 master weights and state split over DP ranks
    bucket_mb: float = 40.0  # gradient bucket size in MiB of fp32 gradients
    overlap_grad_reduce: bool = True  # start a bucket's reduction from the backward hooks
    overlap_param_gather: bool = False  # all-gather updated weights while the next forward runs
    momentum: float = 0.9  # sgd
    initial_scale: float = 65536.0  # fp16 dynamic loss scale: start value
    min_scale: float = 1.0
    growth_interval: int = 1000  # clean steps before the scale doubles
    hysteresis: int = 2  # overflowing steps before the scale halves
    layer_lr_decay: float = 1.0  # layer i of L trains at lr x d^(L-i), embeddings d^(L+1), head 1 (1: off)
    galore_rank: int = 128  # galore_adamw: rank of the gradient projection
    galore_update_interval: int = 200  # steps between projection refreshes (SVD of the gradient)
    galore_scale: float = 0.25  # factor on the projected-back update (the paper's alpha)
    galore_targets: typing.List[str] = dataclasses.field(default_factory=lambda: ["layers.*"])  # 2-D weights projected
    flat_adamw: str = "auto"  # auto (on for adamw with bf16/fp16 weights on a GPU) | true | false: engine/flat_adamw.py


FINETUNE_METHODS = ("none", "lora", "qlora")
ADAPTER_METHODS = ("lora", "qlora")


@dataclasses.dataclass
class FinetuneConfig:
    """Parameter-efficient fine-tuning (docs/finetuning.md). LoRA freezes the base model and
    trains low-rank adapters on the targeted linears; QLoRA also stores the base in NF4."""
    method: str = "none"  # none | lora | qlora
    base: str = ""  # pretrained checkpoint to start from (weights only); checkpoint.load then resumes this run
    lora_rank: int = 8
    lora_alpha: float = 16.0  # update scale alpha / rank (alpha / sqrt(rank) with lora_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_rslora: bool = False
    # fnmatch patterns over linear names (layers.*.attn.qkv) or aliases q k v o gate up down
    lora_targets: typing.List[str] = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])
    qlora_double_quant: bool = True  # NF4 block scales stored in int8 (0.516 instead of 0.5625 bytes per weight)
    qlora_targets: typing.List[str] = dataclasses.field(default_factory=lambda: ["*"])  # linears kept in NF4 (fnmatch)


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE_DPO_LOSSES = ("simpo", "orpo")  # no reference model, no reference log-probs


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation (docs/preference.md, engine/dpo.py)."""
    beta: float = 0.1  # strength of the pull towards the reference (simpo: reward scale; orpo: the odds term's weight)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | simpo | orpo (the last two without a reference model)
    label_smoothing: float = 0.0  # sigmoid and simpo: the probability of a flipped label (conservative DPO)
    simpo_gamma: float = 0.5  # simpo: the target margin between chosen and rejected rewards
    reference_logps: str = ""  # directory written by tools/dpo_reference_logps.py ("" = reference forward each step)
    reference_checkpoint: str = ""  # reference weights for a resumed full fine-tune ("" = the weights the run starts from)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- parsing ----------------------------------------------------------------------------
def _closest(word, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {match[0]}?" if match else ""


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _convert(value, hint, key: str):
    """Coerce a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        return None if value is None or value == "None" else _convert(value, args[0], key)
    if origin in (list, typing.List):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if hint is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected {'a whole number' if hint is int else 'a number'}, got {value!r}") from None
        if hint is int and isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{key}: expected a whole number, got {value!r}")
            number = int(number)
        return hint(number)
    if hint is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def set_value(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown key {dotted!r}: keys look like section.key with section one of "
                          f"{', '.join(sorted(sections))}{_closest(parts[0], sections)}")
    section = getattr(cfg, parts[0])
    hints = _field_types(type(section))
    if parts[1] not in hints:
        raise ConfigError(f"unknown key {dotted!r}{_closest(parts[1], [f'{k}' for k in hints]).replace('mean ', 'mean ' + parts[0] + '.')}")
    setattr(section, parts[1], _convert(value, hints[parts[1]], dotted))


def apply_mapping(cfg: Config, mapping: dict, prefix: str = "") -> None:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            apply_mapping(cfg, value, f"{key}.")
        else:
            set_value(cfg, dotted, value)


def load_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return data


# Command-line shorthands for keys users type often (the issue's `--objective sft`).
ALIASES = {"objective": "train.objective"}


def parse_args(argv: list[str]) -> Config:
    """--config FILE first, then `--section.key value` / `section.key=value` overrides in order."""
    cfg, overrides, index = Config(), [], 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("--config", "-c"):
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            apply_mapping(cfg, load_yaml(argv[index + 1]))
            index += 2
            continue
        if arg.startswith("--config="):
            apply_mapping(cfg, load_yaml(arg.split("=", 1)[1]))
        elif arg.startswith("--") and "=" in arg:
            overrides.append(tuple(arg[2:].split("=", 1)))
        elif arg.startswith("--"):
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                overrides.append((arg[2:], "true"))  # a bare flag means true
            else:
                overrides.append((arg[2:], argv[index + 1]))
                index += 1
        elif "=" in arg:
            overrides.append(tuple(arg.split("=", 1)))
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --section.key value or section.key=value")
        index += 1
    for key, value in overrides:
        set_value(cfg, ALIASES.get(key, key), value)
    return cfg


# ---- validation -------------------------------------------------------------------------
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config, world_size: int) -> Config:
    """Fill derived values and check every constraint that can be checked without processes."""
    try:
        resolve_preset(cfg.model)
        validate_model(cfg.model, cfg.parallel.tp)
        dp = check_layout(world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    except (ValueError, GridError) as error:
        raise ConfigError(str(error)) from None
    t = cfg.train
    _require(t.iters >= 1, "train.iters", f"must be at least 1, got {t.iters}")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be at least 1, got {t.micro_batch_size}")
    if t.global_batch_size == 0:
        t.global_batch_size = t.micro_batch_size * dp
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not a multiple of train.micro_batch_size x data-parallel size "
             f"= {t.micro_batch_size} x {dp}")
    _require(t.lr_schedule in ("cosine", "linear", "constant", "wsd"), "train.lr_schedule",
             f"must be one of cosine, linear, constant, wsd; got {t.lr_schedule!r}")
    _require(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.min_lr", f"need 0 <= train.min_lr <= train.lr, got {t.min_lr} and {t.lr}")
    _require(0 <= t.warmup_iters, "train.warmup_iters", f"must be non-negative, got {t.warmup_iters}")
    _require(0 < t.wsd_decay_fraction <= 1, "train.wsd_decay_fraction", f"must be in (0, 1], got {t.wsd_decay_fraction}")
    _require(t.clip_grad >= 0, "train.clip_grad", f"must be non-negative, got {t.clip_grad}")
    _require(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}; got {t.precision!r}")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda; got {t.device!r}")
    validate_fp8(t)
    _require(cfg.parallel.cp == 1, "parallel.cp", "context parallelism is not available yet; use 1")
    validate_pipeline(cfg, dp)
    validate_cuda_graphs(cfg)
    validate_batch_ramp(cfg, dp)
    validate_optim(cfg.optim)
    validate_finetune(cfg)
    validate_objective(cfg, dp)
    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval", f"must be non-negative, got {c.interval}")
    _require(c.keep >= 0, "checkpoint.keep", f"must be non-negative, got {c.keep}")
    _require(not c.load or os.path.isdir(c.load), "checkpoint.load", f"directory {c.load!r} does not exist")
    return cfg


OBJECTIVES = ("lm", "sft", "dpo", "reward", "ppo", "grpo")


def validate_objective(cfg: Config, dp: int = 1) -> None:
    """The data each objective needs, and the training controls' ranges."""
    t, d = cfg.train, cfg.data
    _require(t.objective in OBJECTIVES, "train.objective", f"must be one of {', '.join(OBJECTIVES)}; got {t.objective!r}")
    if t.objective == "dpo":
        validate_dpo(cfg)
    elif t.objective == "reward":
        validate_preference_data(cfg)
    elif t.objective in ("ppo", "grpo"):
        validate_rl(cfg, dp)
    elif t.objective == "sft":
        validate_jsonl_data(cfg, "sft", "a chat JSONL file of training conversations")
    else:
        _require(d.mock or bool(d.path), "data.path", "give dataset prefixes, or set data.mock true")
    _require(t.early_stop_patience >= 0, "train.early_stop_patience", f"must be non-negative, got {t.early_stop_patience}")
    _require(not t.early_stop_patience or t.eval_interval > 0, "train.early_stop_patience",
             "early stopping needs validation: set train.eval_interval")
    _require(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor",
             f"must be 0 (off) or greater than 1, got {t.spike_factor}")
    _require(t.spike_max_skips >= 1, "train.spike_max_skips", f"must be at least 1, got {t.spike_max_skips}")


def validate_dpo(cfg: Config) -> None:
    o = cfg.dpo
    validate_preference_data(cfg)
    _require(o.loss in DPO_LOSSES, "dpo.loss", f"must be one of {', '.join(DPO_LOSSES)}; got {o.loss!r}")
    _require(o.beta > 0, "dpo.beta", f"must be positive, got {o.beta}")
    _require(0 <= o.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {o.label_smoothing}")
    _require(o.label_smoothing == 0 or o.loss in ("sigmoid", "simpo"), "dpo.label_smoothing",
             f"applies to the sigmoid and simpo losses only, not dpo.loss {o.loss}")
    _require(o.simpo_gamma >= 0, "dpo.simpo_gamma", f"must be non-negative, got {o.simpo_gamma}")
    if o.loss in REFERENCE_FREE_DPO_LOSSES:
        for key in ("reference_logps", "reference_checkpoint"):
            _require(not getattr(o, key), f"dpo.{key}", f"dpo.loss {o.loss} uses no reference model; leave it empty")
    _require(not o.reference_logps or os.path.isdir(o.reference_logps), "dpo.reference_logps",
             f"directory {o.reference_logps!r} does not exist; write it with tools/dpo_reference_logps.py")
    _require(not o.reference_checkpoint or os.path.isdir(o.reference_checkpoint), "dpo.reference_checkpoint",
             f"directory {o.reference_checkpoint!r} does not exist")


def validate_preference_data(cfg: Config) -> None:
    validate_jsonl_data(cfg, "preference", "a JSONL file of preference pairs (prompt, chosen, rejected)")
    _require(cfg.data.preference_format in ("chat", "text"), "data.preference_format",
             f"must be chat or text; got {cfg.data.preference_format!r}")


def validate_jsonl_data(cfg: Config, prefix: str, what: str) -> None:
    """data.<prefix>_train (required) and data.<prefix>_valid JSONL files, and the tokenizer."""
    t, d = cfg.train, cfg.data
    train_key, valid_key = f"data.{prefix}_train", f"data.{prefix}_valid"
    train, valid = getattr(d, f"{prefix}_train"), getattr(d, f"{prefix}_valid")
    _require(bool(train), train_key, f"train.objective {t.objective} needs {what}")
    for key, path in ((train_key, train), (valid_key, valid)):
        _require(not path or os.path.isfile(path), key, f"file {path!r} does not exist")
    _require(bool(d.tokenizer), "data.tokenizer", f"train.objective {t.objective} needs the tokenizer (model file or directory)")
    _require(not t.eval_interval or bool(valid), valid_key, "train.eval_interval is set but there is no validation JSONL")


def validate_pipeline(cfg: Config, dp: int) -> None:
    """Stage split and microbatch count that the pipeline schedules can run."""
    p = cfg.parallel
    _require(p.vpp >= 1, "parallel.vpp", f"must be at least 1, got {p.vpp}")
    _require(p.vpp == 1 or p.pp > 1, "parallel.vpp", f"virtual stages ({p.vpp}) need parallel.pp > 1")
    if p.pp == 1 and not p.pipeline_layers:
        return
    try:
        if p.pipeline_layers.strip() == "auto":
            p.pipeline_layers = ",".join(map(str, balanced_layer_counts(
                cfg.model.num_layers, p.pp, p.vpp, cfg.model.output_layer_in_layers())))
        stage_layer_counts(cfg.model.num_layers, p.pp, p.vpp, p.pipeline_layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    _require(p.vpp == 1 or microbatches % p.pp == 0, "train.global_batch_size",
             f"the interleaved schedule (parallel.vpp={p.vpp}) needs the number of microbatches per step "
             f"(global batch / (micro batch x data-parallel size) = {microbatches}) to be a multiple of "
             f"parallel.pp={p.pp}")
    _require(not (p.sp and p.tp > 1) or cfg.model.seq_length % p.tp == 0, "model.seq_length",
             f"{cfg.model.seq_length} must be divisible by parallel.tp={p.tp} under sequence parallelism")


def validate_fp8(t: TrainConfig) -> None:
    _require(t.fp8_format in ("hybrid", "e4m3"), "train.fp8_format", f"must be hybrid or e4m3; got {t.fp8_format!r}")
    _require(t.fp8_scaling in ("tensor", "row"), "train.fp8_scaling", f"must be tensor or row; got {t.fp8_scaling!r}")
    _require(t.fp8_amax_history >= 1, "train.fp8_amax_history", f"must be at least 1, got {t.fp8_amax_history}")
    _require(t.fp8_backend in FP8_BACKENDS, "train.fp8_backend",
             f"must be one of {', '.join(FP8_BACKENDS)}; got {t.fp8_backend!r}")
    row = t.fp8_scaling == "row"
    _require(not row or t.fp8_amax_history == 1, "train.fp8_amax_history",
             "applies to tensor scaling only; row scales come from each step's values (set it to 1)")


def validate_cuda_graphs(cfg: Config) -> None:
    """What the captured layer graphs cannot replay (models/layer_graphs.py)."""
    m, key = cfg.model, "model.cuda_graphs"
    if not m.cuda_graphs:
        return
    device = cfg.train.device
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    _require(on_cuda, key, f"CUDA graphs need a CUDA device (train.device is {device}"
             f"{'' if device == 'cpu' else ' and none is available'})")
    _require(cfg.parallel.pp == 1, key, f"needs parallel.pp 1 (got {cfg.parallel.pp}): a pipeline keeps several "
             "micro-batches' activations alive and a graph holds one")
    _require(m.recompute == "none", key, f"cannot replay activation recompute; set model.recompute none (got {m.recompute})")
    _require(m.dropout == 0 and m.attention_dropout == 0, key,
             f"needs model.dropout and model.attention_dropout 0 (got {m.dropout} and {m.attention_dropout})")
    _require(cfg.finetune.lora_dropout == 0, key, f"needs finetune.lora_dropout 0 (got {cfg.finetune.lora_dropout})")
    # The graph warm-up runs the layers outside the step, which would push extra amaxes into
    # the FP8 amax histories; the graphed run then scales differently from an eager one (on an
    # H200 its gradients missed the 2% agreement with eager that the other recipes meet).
    _require(not (cfg.train.precision == "fp8" and cfg.train.fp8_amax_history > 1), key,
             f"cannot keep train.fp8_amax_history {cfg.train.fp8_amax_history} exact across the graph warm-up; "
             "use train.fp8_amax_history 1 (current scaling) or model.cuda_graphs false")
    # These objectives' batches always carry document ids (packed conversations, rollouts). The
    # graphs replay them through SDPA's dense document mask only; with another backend every
    # forward would run the eager layers and the graphs would never be used.
    _require(cfg.train.objective not in ("sft", "ppo", "grpo") or m.attention_backend == "sdpa", key,
             f"train.objective {cfg.train.objective} packs documents into its sequences, which the graphs replay "
             f"only with model.attention_backend sdpa (got {m.attention_backend}); set it, or model.cuda_graphs false")


def validate_batch_ramp(cfg: Config, dp: int) -> None:
    """Every global batch of the ramp must split into whole micro-batches on every DP rank
    (and into a multiple of the pipeline depth for the interleaved schedule)."""
    t, p = cfg.train, cfg.parallel
    if not t.batch_ramp:
        return
    key = "train.batch_ramp"
    _require(len(t.batch_ramp) == 3, key, f"give start increment samples (e.g. 8 8 10000), got {t.batch_ramp}")
    start, increment, samples = t.batch_ramp
    unit = t.micro_batch_size * dp
    _require(start > 0 and increment > 0 and samples > 0, key, f"start, increment and samples must be positive, got {t.batch_ramp}")
    _require(start % unit == 0 and increment % unit == 0, key,
             f"start {start} and increment {increment} must be multiples of train.micro_batch_size x data-parallel "
             f"size = {t.micro_batch_size} x {dp}")
    _require(start < t.global_batch_size and (t.global_batch_size - start) % increment == 0, key,
             f"start {start} plus whole increments of {increment} must reach train.global_batch_size "
             f"{t.global_batch_size}")
    _require(p.vpp == 1 or (start // unit % p.pp == 0 and increment // unit % p.pp == 0), key,
             f"the interleaved schedule needs every step's micro-batch count to be a multiple of parallel.pp={p.pp}")


def validate_finetune(cfg: Config) -> None:
    f, c = cfg.finetune, cfg.checkpoint
    _require(f.method in FINETUNE_METHODS, "finetune.method",
             f"must be one of {', '.join(FINETUNE_METHODS)}; got {f.method!r}")
    _require(not f.base or os.path.isdir(f.base), "finetune.base", f"directory {f.base!r} does not exist")
    _require(not (f.base and c.load_model_only), "checkpoint.load_model_only",
             "finetune.base already gives the pretrained weights; checkpoint.load then resumes this run, "
             "so leave checkpoint.load_model_only false")
    if f.method not in ADAPTER_METHODS:
        return
    _require(not c.load_model_only, "checkpoint.load_model_only",
             f"finetune.method {f.method} takes its pretrained weights from finetune.base (adapters are new); "
             "use --finetune.base DIR")
    _require(f.lora_rank >= 1, "finetune.lora_rank", f"must be at least 1, got {f.lora_rank}")
    _require(f.lora_alpha > 0, "finetune.lora_alpha", f"must be positive, got {f.lora_alpha}")
    _require(0 <= f.lora_dropout < 1, "finetune.lora_dropout", f"must be in [0, 1), got {f.lora_dropout}")
    _require(bool(f.lora_targets), "finetune.lora_targets",
             "give at least one module pattern (layers.*.attn.qkv) or alias (q k v o gate up down)")
    _require(f.method != "qlora" or bool(f.qlora_targets), "finetune.qlora_targets",
             "give at least one linear-name pattern (* for every tensor-parallel linear)")
    # FP8 replaces every linear's linear_fn after the model is built, which would drop the adapters.
    _require(cfg.train.precision != "fp8", "train.precision", f"fp8 is not available with finetune.method {f.method}; use bf16")
    _require(cfg.optim.name != "galore_adamw", "optim.name",
             f"galore_adamw is for full fine-tuning; finetune.method {f.method} trains only small adapters, use adamw")


def validate_optim(o: OptimConfig) -> None:
    _require(o.name in OPTIMIZERS, "optim.name", f"must be one of {', '.join(OPTIMIZERS)}; got {o.name!r}")
    _require(not (o.shard and o.name in ("adafactor", "galore_adamw")), "optim.shard",
             f"{o.name} works on whole matrices and cannot be sharded over data-parallel ranks; use false")
    _require(o.bucket_mb > 0, "optim.bucket_mb", f"must be positive, got {o.bucket_mb}")
    _require(not o.overlap_param_gather or o.shard, "optim.overlap_param_gather",
             "only applies to the sharded optimizer; set optim.shard true or leave it false")
    _require(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _require(o.min_scale > 0, "optim.min_scale", f"must be positive, got {o.min_scale}")
    _require(o.initial_scale >= o.min_scale, "optim.initial_scale",
             f"must be at least optim.min_scale = {o.min_scale}, got {o.initial_scale}")
    _require(o.growth_interval >= 1, "optim.growth_interval", f"must be at least 1, got {o.growth_interval}")
    _require(o.hysteresis >= 1, "optim.hysteresis", f"must be at least 1, got {o.hysteresis}")
    _require(0 < o.layer_lr_decay <= 1, "optim.layer_lr_decay", f"must be in (0, 1] (1: off), got {o.layer_lr_decay}")
    _require(o.galore_rank >= 1, "optim.galore_rank", f"must be at least 1, got {o.galore_rank}")
    _require(o.galore_update_interval >= 1, "optim.galore_update_interval",
             f"must be at least 1, got {o.galore_update_interval}")
    _require(o.galore_scale > 0, "optim.galore_scale", f"must be positive, got {o.galore_scale}")
    o.flat_adamw = str(o.flat_adamw).lower()  # a YAML true arrives as "True"
    _require(o.flat_adamw in ("auto", "true", "false"), "optim.flat_adamw",
             f"must be auto, true or false; got {o.flat_adamw!r}")
    _require(o.flat_adamw != "true" or o.name == "adamw", "optim.flat_adamw",
             f"true needs optim.name adamw (it is an AdamW step), got {o.name!r}; use auto or false")


def describe_keys() -> str:
    """Every configuration key with its type and default, for --help."""
    lines = ["Configuration keys (YAML sections, or --section.key value on the command line):"]
    for section in dataclasses.fields(Config):
        instance = section.default_factory()
        hints = _field_types(type(instance))
        for field in dataclasses.fields(instance):
            hint = getattr(hints[field.name], "__name__", str(hints[field.name]))
            lines.append(f"  {section.name}.{field.name:<28} {hint:<10} default {getattr(instance, field.name)!r}")
    return "\n".join(lines)
