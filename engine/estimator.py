"""Per-GPU memory and step-time estimates for a model and a parallel layout (pure arithmetic).

Memory follows what Trellis allocates (docs/optimizer.md, docs/pipeline.md): weights, the fp32
gradient buffer, optimizer state with fp32 masters, the activations the schedule keeps alive on
the busiest pipeline stage, the output layer's chunked logits and a calibrated allowance for
the caching allocator's fragmentation and library workspaces. Step time is compute (model FLOPs
at an achieved TFLOP/s, or the host's launch time where that is longer) plus the optimizer's
memory traffic plus the exposed communication, stretched by the pipeline bubble. Calibration and its check: docs/benchmarks.md, "Estimator".
"""
from __future__ import annotations

import dataclasses
import math

from models.config import ModelConfig

GIB = 2**30

# Bytes per parameter of the weights as stored, of the gradient buffer, and of the optimizer
# (Adam moments, plus fp32 master weights on the mixed-precision path).
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "bf16-autocast": 4, "fp32": 4}
GRAD_BYTES = {"bf16": 4, "fp16": 4, "fp8": 4, "bf16-autocast": 4, "fp32": 4}  # fp32 main_grad / .grad
ADAM_BYTES = {"bf16": 12, "fp16": 12, "fp8": 12, "bf16-autocast": 8, "fp32": 8}
# Bytes of one element of a saved activation: matmul inputs are bf16 under every mixed precision;
# under bf16-autocast and fp32 the residual stream (norm inputs) stays fp32.
RESIDUAL_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "bf16-autocast": 4, "fp32": 4}
FP8_COPY_BYTES = 2  # each weight's e4m3 copy in both layouts
MATMUL_INPUT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "bf16-autocast": 2, "fp32": 4}

# Achieved dense-math rate of the forward/backward (model FLOPs per second, excluding the
# optimizer step). bf16 is fitted to two llama-1.3b runs of the current engine on one H200, at
# 1 and 8 micro-batches a step (58758 and 64226 tokens/s): their difference gives the rate per
# micro-batch, and the rest of the one-micro-batch step is the optimizer's (docs/benchmarks.md,
# "Estimator refit"). fp8 is bf16's rate times the measured fp8/bf16 forward-backward ratio of
# the 8-layer llama3-8b cut (1.31x without the optimizer: 803.6 against 613.4 TFLOP/s, H200,
# section "Fine-tuning with a frozen output layer ...", fourteenth). That cut's bf16 runs
# 5% above the 1.3b fit (wider GEMMs), so its estimates come out about 4.5% low.
# compile, fp16 and bf16-autocast were fitted on an H100 to earlier engines; see that file's
# "Estimator" section.
BF16_TFLOPS = 585.0
FP8_OVER_BF16 = 1.31
DEFAULT_TFLOPS = {"bf16": BF16_TFLOPS, "fp16": 383.0, "fp8": BF16_TFLOPS * FP8_OVER_BF16, "bf16-autocast": 300.0,
                  "fp32": 50.0}
COMPILE_TFLOPS_GAIN = 0.98  # bf16 + model.compile against bf16 eager on llama-1.3b (46129 / 47119)
OPTIMIZER_BYTES_PER_PARAM = 34  # flat AdamW: read/write masters and moments, read grads, write weights
HBM_BYTES_PER_S = 4.4e12  # the flat AdamW pass alone on an H200 (csrc/adamw.cu: 10.46 ms for 1.36B params)
CE_CHUNK_TOKENS = 2048  # parallel/linear_cross_entropy.py keeps logits for this many tokens at a time
# Sequence parallelism's extra collectives and copies lengthen the host's per-layer time
# (6.2 against 5.3 ms per layer and micro-batch, TP=2 with and without SP on 4 H200s).
HOST_SP_FACTOR = 6.2 / 5.3
# Fragmentation and workspace allowance: fraction of the tensor total plus a fixed part (cuBLAS
# and cuDNN workspaces, communication buffers); calibrated on the one-GPU runs.
ALLOWANCE_FRACTION = 0.03
ALLOWANCE_FIXED_GIB = 0.5


@dataclasses.dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sp: bool = False
    micro_batch: int = 1
    global_batch: int = 0  # 0: micro_batch x dp (one microbatch per step)
    recompute: str = "none"  # none | full
    precision: str = "bf16"
    shard_optimizer: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # model.cuda_graphs: the layers' host time is a graph replay (pp=1 only)
    # "dpo": a frozen reference copy of the model runs a forward of every sequence, and the
    # per-token losses recompute the output layer in backward; "dpo-no-reference" (dpo.loss simpo
    # or orpo) has the pairs and the per-token losses without the reference. micro_batch and
    # global_batch count sequences (a pair is two; tools/estimate.py converts).
    objective: str = "lm"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def microbatches(self) -> int:
        batch = self.global_batch or self.micro_batch * self.dp
        return batch // (self.micro_batch * self.dp)


@dataclasses.dataclass
class Hardware:
    """Link bandwidths are achieved bus bandwidths (bytes/s) of NCCL collectives on H100 systems."""
    gpu_mem_gib: float = 80.0
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 360e9  # NVLink 4 all-reduce bus bandwidth, 8 GPUs
    network_bytes_per_s: float = 40e9  # 400 Gb/s InfiniBand per GPU
    tflops: float = 0.0  # 0: DEFAULT_TFLOPS for the precision
    # Host (Python, autograd, kernel-launch) time of one layer's forward and backward for one
    # micro-batch in the eager engine, whatever the GPU's share of the work: a stage's micro-batch
    # takes at least this per layer. Fitted to TP=2 and TP=4 on 4 H200s, whose steps took as
    # long as one GPU's (1.025 and 1.012 s for 8 micro-batches of 24 layers, against 1.102 s;
    # docs/benchmarks.md, "Multi-GPU on 4 H200s").
    host_seconds_per_layer: float = 5.3e-3


# ---- parameters -----------------------------------------------------------------------------
def layer_params(m: ModelConfig) -> int:
    """One transformer layer: QKV, projection, MLP, two norms (biases where the model has them)."""
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.num_kv_heads * m.head_dim()
    mlp_in = (2 if m.activation == "swiglu" else 1) * f
    weights = h * (h + 2 * kv) + h * h + h * mlp_in + f * h + 2 * h
    biases = (h + 2 * kv) if (m.add_bias_linear or m.add_qkv_bias) else 0
    if m.add_bias_linear:
        biases += h + mlp_in + h + (2 * h if m.norm == "layernorm" else 0)
    return weights + biases


def stage_layer_params(m: ModelConfig, layout: Layout) -> float:
    """The transformer layers' parameters on one GPU of a pipeline stage (its TP shard)."""
    return (m.num_layers // layout.pp) * layer_params(m) / layout.tp


def table_params(m: ModelConfig, layout: Layout) -> float:
    """One GPU's shard of the (padded) vocabulary table: the embedding or the output layer."""
    return m.padded_vocab_size(layout.tp) * m.hidden_size / layout.tp


def stage_params(m: ModelConfig, layout: Layout, first: bool, last: bool) -> int:
    """Parameters one GPU of a pipeline stage holds (its TP shard)."""
    params = stage_layer_params(m, layout)
    if first:
        params += table_params(m, layout)
        params += m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned" else 0
    if last:
        params += m.hidden_size  # final norm
        if not m.tie_embeddings or layout.pp > 1:  # untied, or the last stage's tied copy
            params += table_params(m, layout)
    return int(params)


# ---- activations ----------------------------------------------------------------------------
def layer_activation_bytes(m: ModelConfig, layout: Layout, seq: int) -> float:
    """Bytes one transformer layer saves for backward for one microbatch (Korthikanti et al.'s
    count, s*b*h*(34 + 5*a*s/h) for GPT-3 in 16-bit, without the a*s^2 score terms: flash/SDPA
    attention keeps only its output and log-sum-exp). Generalised to GQA, SwiGLU and no dropout:
    - residual stream: the two norm inputs (RESIDUAL_BYTES each);
    - attention: norm output (QKV input), Q, K, V (RoPE's backward needs only cos/sin), and the
      attention output, which is also the projection's input;
    - MLP: norm output (fc1 input), and 2 tensors of f for GeLU (fc1 output, fc2 input) or 3 for
      SwiGLU (fc1's gate and up, and their product = fc2 input: the fused SwiGLU recomputes
      silu(gate) in its backward);
    - dropout masks (1 byte) after attention and MLP when dropout > 0.
    Tensors of [s, b, h] are split over TP under sequence parallelism; those inside the
    TP region (Q, K, V, attention output, MLP intermediates) are always split over TP."""
    s, b, h, f, tp = seq, layout.micro_batch, m.hidden_size, m.ffn_hidden_size, layout.tp
    kv = m.num_kv_heads * m.head_dim()
    r, x = RESIDUAL_BYTES[layout.precision], MATMUL_INPUT_BYTES[layout.precision]
    sp_split = tp if layout.sp else 1
    replicated = s * b * h * (2 * r + 2 * x) / sp_split  # norm inputs, QKV and fc1 inputs
    attention = s * b * (2 * h + 2 * kv) * x / tp  # Q, K, V, attention output (= projection input)
    mlp = s * b * f * (3 if m.activation == "swiglu" else 2) * x / tp
    dropout = 2 * s * b * h / sp_split if m.dropout > 0 else 0
    attention_scores = 0  # flash / SDPA: no [a, s, s] tensor is saved
    return replicated + attention + mlp + dropout + attention_scores


def layer_input_bytes(m: ModelConfig, layout: Layout, seq: int) -> float:
    """What full recompute keeps per layer: its input on the residual stream."""
    return seq * layout.micro_batch * m.hidden_size * RESIDUAL_BYTES[layout.precision] / (layout.tp if layout.sp else 1)


def microbatches_in_flight(layout: Layout) -> float:
    """Microbatches whose activations the first stage holds at its peak, in units of its layers'
    activations: 1F1B warms up with pp microbatches; interleaved 1F1B (Megatron, Korthikanti et
    al. eq. 5) holds pp * (1 + (pp-1)/(pp*vpp)) stage-equivalents. Never more than the step has."""
    p, v, m = layout.pp, layout.vpp, layout.microbatches()
    if p == 1:
        return 1.0
    in_flight = p * (1 + (p - 1) / (p * v)) if v > 1 else p
    return min(in_flight, m)


def activation_bytes(m: ModelConfig, layout: Layout, in_flight: float | None = None) -> float:
    """Activations alive at a stage's peak: by default the first stage's (the busiest); the
    last stage of 1F1B holds one microbatch (in_flight=1)."""
    seq, layers = m.seq_length, m.num_layers // layout.pp
    in_flight = microbatches_in_flight(layout) if in_flight is None else in_flight
    if layout.recompute == "full":
        kept = layers * layer_input_bytes(m, layout, seq) * in_flight
        return kept + layer_activation_bytes(m, layout, seq)  # one layer recomputed at a time
    return layers * layer_activation_bytes(m, layout, seq) * in_flight


def logits_bytes(m: ModelConfig, layout: Layout) -> float:
    """The output layer's transient: for one chunk of tokens (fused cross-entropy) the fp32
    logits and their gradient in the matmul dtype (the softmax statistics are read from the
    logits in one compiled pass, parallel/chunk_cross_entropy.py); otherwise, for the whole
    microbatch, the bf16 logits and the fp32 softmax. A weight tied to the embedding on the
    same stage (pp 1) also holds its fp32 gradient from forward to backward under the fused
    path; an untied one's goes straight into main_grad."""
    tokens = m.seq_length * layout.micro_batch
    vocab = m.padded_vocab_size(layout.tp) / layout.tp
    if m.fused_cross_entropy:
        tied_gradient = table_params(m, layout) * 4 if m.tie_embeddings and layout.pp == 1 else 0
        per_element = 4 + MATMUL_INPUT_BYTES[layout.precision]
        return min(tokens, CE_CHUNK_TOKENS) * vocab * per_element + tied_gradient
    return tokens * vocab * (2 + 4)  # bf16 logits and the fp32 softmax kept for backward


# ---- memory ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    allowance: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def gib(self) -> dict:
        return {k: v / GIB for k, v in dataclasses.asdict(self).items()} | {"total": self.total / GIB}


def stage_memory(m: ModelConfig, layout: Layout, first: bool, last: bool) -> Memory:
    p = layout.precision
    params = stage_params(m, layout, first, last)
    optimizer = params * ADAM_BYTES[p] / (layout.dp if layout.shard_optimizer else 1)
    # The linears, the output layer and an untied embedding add their 16-bit weights' gradients
    # straight into the fp32 main_grad; only an embedding tied to the output layer on the same
    # stage takes the plain path, whose 16-bit .grad of the whole table lives until its hook
    # adds it in (parallel/main_grad_embedding.py).
    plain_tied_table = first and last and m.tie_embeddings and WEIGHT_BYTES[p] == 2
    tied_table_grad = table_params(m, layout) * 2 if plain_tied_table else 0
    gradients = params * GRAD_BYTES[p] + tied_table_grad
    activations = activation_bytes(m, layout, None if first else 1.0)
    logits = logits_bytes(m, layout) if last else 0.0
    if layout.recompute == "full":
        # The output layer's transient is freed before the last layer is recomputed, so only
        # the larger of the two is ever alive (activation_bytes already holds the layer).
        logits = max(0.0, logits - layer_activation_bytes(m, layout, m.seq_length))
    weights = params * WEIGHT_BYTES[p] * (2 if layout.objective == "dpo" else 1)  # + the reference copy
    if p == "fp8":  # the trained layers' FP8 weight copies, kept for the step (parallel/fp8.py)
        weights += stage_layer_params(m, layout) * FP8_COPY_BYTES
    tensors = weights + gradients + optimizer + activations + logits
    allowance = tensors * ALLOWANCE_FRACTION + ALLOWANCE_FIXED_GIB * GIB
    return Memory(weights, gradients, optimizer, activations, logits, allowance)


def peak_memory(m: ModelConfig, layout: Layout) -> Memory:
    """The larger of the first stage (most activations) and the last stage (output layer)."""
    if layout.pp == 1:
        return stage_memory(m, layout, True, True)
    first, last = stage_memory(m, layout, True, False), stage_memory(m, layout, False, True)
    return first if first.total >= last.total else last


# ---- time -----------------------------------------------------------------------------------
def ring_seconds(message_bytes: float, ranks: int, bandwidth: float, passes: float) -> float:
    """Ring collective: `passes` x (n-1)/n of the message crosses each link (all-reduce: 2)."""
    return 0.0 if ranks == 1 else passes * (ranks - 1) / ranks * message_bytes / bandwidth


def group_bandwidth(hw: Hardware, span: int) -> float:
    """A group whose ranks lie within one node uses NVLink; otherwise the network."""
    return hw.nvlink_bytes_per_s if span <= hw.gpus_per_node else hw.network_bytes_per_s


@dataclasses.dataclass
class StepTime:
    compute: float
    optimizer: float
    tp_comm: float
    dp_comm: float
    pp_comm: float
    bubble: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


def achieved_tflops(layout: Layout, hw: Hardware) -> float:
    if hw.tflops:
        return hw.tflops
    rate = DEFAULT_TFLOPS[layout.precision]
    return rate * COMPILE_TFLOPS_GAIN if layout.compile else rate


PAIR_OBJECTIVES = ("dpo", "dpo-no-reference")


def sequences_per_sample(objective: str) -> int:
    """A preference sample is a pair: two sequences."""
    return 2 if objective in PAIR_OBJECTIVES else 1


def busiest_stage_flops_per_token(m: ModelConfig, layout: Layout) -> float:
    """Model FLOPs per token of the slowest pipeline stage, which sets every stage's pace: with
    an even split of the layers, the last stage, which also runs the output layer (1.1 layers'
    worth in llama-1.3b)."""
    output_layer = m.output_layer_flops_per_token()
    return (m.flops_per_token() - output_layer) / layout.pp + output_layer


def step_time(m: ModelConfig, layout: Layout, hw: Hardware) -> StepTime:
    micro, layers = layout.microbatches(), m.num_layers // layout.pp
    tokens_per_gpu = micro * layout.micro_batch * m.seq_length  # per model replica, over its tp*pp GPUs
    recompute = 4 / 3 if layout.recompute == "full" else 1.0
    flops = busiest_stage_flops_per_token(m, layout) * tokens_per_gpu * recompute / layout.tp
    if layout.objective in PAIR_OBJECTIVES:
        # The reference forward is 2 of training's 6 FLOPs per parameter and token; the
        # per-token losses run the output layer's forward (a third of its share) again in backward.
        reference = 4 / 3 if layout.objective == "dpo" else 1.0
        flops = flops * reference + m.output_layer_flops_per_token() / 3 * tokens_per_gpu / layout.tp
    host_per_layer = hw.host_seconds_per_layer * (HOST_SP_FACTOR if layout.sp and layout.tp > 1 else 1.0)
    if layout.cuda_graphs and layout.pp == 1:
        host_per_layer = 0.0  # replays cost microseconds (TP=2: 37.0k -> 46.6k tokens/s per GPU on H200s)
    host = micro * layers * host_per_layer * recompute  # the GPU waits for the host when its share is smaller
    compute = max(flops / (achieved_tflops(layout, hw) * 1e12), host)
    params = stage_params(m, layout, True, layout.pp == 1)
    optimizer = params * OPTIMIZER_BYTES_PER_PARAM / (layout.dp if layout.shard_optimizer else 1) / HBM_BYTES_PER_S
    # TP: per layer 2 all-reduces forward and 2 backward (SP: the same volume as all-gather +
    # reduce-scatter), one more forward's worth under full recompute; not overlapped.
    activation_message = m.seq_length * layout.micro_batch * m.hidden_size * 2
    per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp_bw = group_bandwidth(hw, layout.tp)
    tp_comm = micro * layers * per_layer * ring_seconds(activation_message, layout.tp, tp_bw, 1.0)
    # DP: fp32 gradients reduced (all-reduce, or reduce-scatter + a bf16 all-gather when sharded);
    # overlapped with the last microbatch's backward (2/3 of its compute), the rest is exposed.
    dp_bw = group_bandwidth(hw, layout.tp * layout.dp)
    if layout.shard_optimizer:
        dp_full = ring_seconds(params * 4, layout.dp, dp_bw, 1.0) + ring_seconds(params * 2, layout.dp, dp_bw, 1.0)
    else:
        dp_full = ring_seconds(params * 4, layout.dp, dp_bw, 2.0)
    dp_comm = max(0.0, dp_full - compute / micro * 2 / 3)
    # PP: each microbatch's activation goes forward and its gradient back once per stage boundary
    # (per virtual chunk); the critical path crosses (m + p - 1) of them each way.
    pp_bw = group_bandwidth(hw, layout.gpus)  # stages lie farthest apart in the rank order
    pp_message = activation_message / (layout.tp if layout.sp else 1)
    pp_comm = 0.0 if layout.pp == 1 else 2 * (micro * layout.vpp + layout.pp - 1) * pp_message / pp_bw
    bubble = compute * (layout.pp - 1) / (micro * layout.vpp)
    return StepTime(compute, optimizer, tp_comm, dp_comm, pp_comm, bubble)


def tokens_per_second(m: ModelConfig, layout: Layout, hw: Hardware) -> float:
    """Tokens of the whole job per second (divide by layout.gpus for per-GPU)."""
    tokens = layout.microbatches() * layout.micro_batch * layout.dp * m.seq_length
    return tokens / step_time(m, layout, hw).total


# ---- planning -------------------------------------------------------------------------------
def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_valid(m: ModelConfig, layout: Layout) -> bool:
    """The constraints engine/config.py enforces, checked without building anything."""
    kv_ok = m.num_kv_heads % layout.tp == 0 and m.num_heads % layout.tp == 0 and m.ffn_hidden_size % layout.tp == 0
    pp_ok = m.num_layers % (layout.pp * layout.vpp) == 0
    batch_ok = layout.global_batch % (layout.micro_batch * layout.dp) == 0
    interleave_ok = layout.vpp == 1 or (layout.pp > 1 and layout.microbatches() % layout.pp == 0)
    return kv_ok and pp_ok and batch_ok and interleave_ok and (not layout.sp or m.seq_length % layout.tp == 0)


def plan(m: ModelConfig, gpus: int, global_batch: int, hw: Hardware, precision: str = "bf16",
         micro_batches=(1, 2, 4, 8), max_tp: int = 8, objective: str = "lm") -> list:
    """Every valid layout on `gpus` GPUs that fits in hw.gpu_mem_gib, fastest first, as
    (tokens/s, Layout, Memory, StepTime). For dpo, global_batch and micro_batches count pairs."""
    per_sample = sequences_per_sample(objective)
    results = []
    for tp in [t for t in divisors(gpus) if t <= max_tp]:
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for vpp, mb, recompute, shard in _choices(pp, dp, micro_batches):
                layout = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, sp=tp > 1, micro_batch=mb * per_sample,
                                global_batch=global_batch * per_sample, recompute=recompute, precision=precision,
                                shard_optimizer=shard, objective=objective)
                if not layout_valid(m, layout) or layout.microbatches() < 1:
                    continue
                memory = peak_memory(m, layout)
                if memory.total > hw.gpu_mem_gib * GIB:
                    continue
                results.append((tokens_per_second(m, layout, hw), layout, memory, step_time(m, layout, hw)))
    results.sort(key=lambda r: -r[0])
    return results


def _choices(pp: int, dp: int, micro_batches):
    for vpp in ((1, 2, 4) if pp > 1 else (1,)):
        for mb in micro_batches:
            for recompute in ("none", "full"):
                for shard in ((True, False) if dp > 1 else (False,)):  # sharding over one rank changes nothing
                    yield vpp, mb, recompute, shard


def describe(layout: Layout) -> str:
    parts = [f"tp{layout.tp}", f"pp{layout.pp}"] + ([f"vpp{layout.vpp}"] if layout.vpp > 1 else [])
    per_sample = sequences_per_sample(layout.objective)  # shown in pairs, as they are given
    global_batch = layout.global_batch or layout.micro_batch * layout.dp
    parts += [f"dp{layout.dp}", f"mb{layout.micro_batch // per_sample}", f"gb{global_batch // per_sample}"]
    parts += (["sp"] if layout.sp and layout.tp > 1 else []) + (["recompute"] if layout.recompute == "full" else [])
    parts += (["shard"] if layout.shard_optimizer else []) + (["compile"] if layout.compile else []) + (
        ["cuda-graphs"] if layout.cuda_graphs and layout.pp == 1 else [])
    parts += [layout.objective] if layout.objective != "lm" else []
    return " ".join(parts + [layout.precision])


def gib_ceil(value: float) -> float:
    return math.ceil(value / GIB * 10) / 10
