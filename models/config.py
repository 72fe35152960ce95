"""The GPT family's architecture description and its named presets."""
from __future__ import annotations

import dataclasses

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex", "te")  # model.attention_backend (models/attention.py)


@dataclasses.dataclass
class ModelConfig:
    """Architecture of one GPT-family model. `preset` fills the other fields; values given
    explicitly (YAML or command line) override the preset's."""

    preset: str = "tiny"
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0  # 0: same as num_heads (no GQA)
    ffn_hidden_size: int = 0
    vocab_size: int = 0
    seq_length: int = 0
    max_position_embeddings: int = 0
    norm: str = ""  # layernorm | rmsnorm
    activation: str = ""  # gelu | swiglu
    position_embedding: str = ""  # learned | rope
    rope_theta: float = 0.0
    norm_eps: float = 0.0
    add_bias_linear: bool | None = None  # biases on all linears (GPT-2)
    add_qkv_bias: bool | None = None  # bias on QKV only (Qwen2)
    tie_embeddings: bool | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    recompute: str = "none"  # none | full
    fused_cross_entropy: bool = True  # chunked output layer + loss, never the full logits
    compile: bool = False  # torch.compile each transformer layer (names and checkpoints unchanged)
    cuda_graphs: bool = False  # replay the layers' forward and backward as CUDA graphs (models/layer_graphs.py)
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS (models/attention.py)

    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary padded so each TP rank holds an equal, aligned slice."""
        multiple = self.make_vocab_size_divisible_by
        padded = -(-self.vocab_size // multiple) * multiple
        while padded % tp:
            padded += multiple
        return padded

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls (embedding lookup excluded, output layer in)."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_kv_heads * self.head_dim()
        attn = h * (h + 2 * kv) + h * h
        mlp = (3 if self.activation == "swiglu" else 2) * h * f
        return self.num_layers * (attn + mlp) + self.vocab_size * h

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token: 6 x matmul params + 12 x layers x hidden x seq
        (the attention score and value matmuls, forward and backward)."""
        return 6.0 * self.matmul_params() + 12.0 * self.num_layers * self.hidden_size * self.seq_length

    def output_layer_flops_per_token(self) -> float:
        """The output projection's share of `flops_per_token` (forward and backward)."""
        return 6.0 * self.vocab_size * self.hidden_size

    def output_layer_in_layers(self) -> float:
        """The output layer's FLOPs per token in units of one transformer layer's (1.1 in
        llama-1.3b): what the pipeline stage that runs it carries beyond its layers."""
        output = self.output_layer_flops_per_token()
        return output / ((self.flops_per_token() - output) / self.num_layers)


_GPT2 = dict(norm="layernorm", activation="gelu", position_embedding="learned", norm_eps=1e-5,
             add_bias_linear=True, add_qkv_bias=True, tie_embeddings=True, rope_theta=10000.0)
_LLAMA = dict(norm="rmsnorm", activation="swiglu", position_embedding="rope", norm_eps=1e-5,
              add_bias_linear=False, add_qkv_bias=False, tie_embeddings=False, rope_theta=10000.0)

PRESETS = {
    "tiny": dict(_LLAMA, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                 vocab_size=512, seq_length=64, max_position_embeddings=256),
    "tiny-gpt2": dict(_GPT2, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=256,
                      vocab_size=512, seq_length=64, max_position_embeddings=256),
    "tiny-qwen2": dict(_LLAMA, add_qkv_bias=True, tie_embeddings=True, num_layers=2, hidden_size=64,
                       num_heads=4, num_kv_heads=2, ffn_hidden_size=160, vocab_size=512, seq_length=64,
                       max_position_embeddings=256, norm_eps=1e-6, rope_theta=1000000.0),
    "gpt2-124m": dict(_GPT2, num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=12,
                      ffn_hidden_size=3072, vocab_size=50257, seq_length=1024, max_position_embeddings=1024),
    "llama-1.3b": dict(_LLAMA, num_layers=24, hidden_size=2048, num_heads=16, num_kv_heads=16,
                       ffn_hidden_size=5632, vocab_size=32000, seq_length=2048, max_position_embeddings=4096),
    "llama2-7b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                      ffn_hidden_size=11008, vocab_size=32000, seq_length=4096, max_position_embeddings=4096),
    "llama3-8b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                      ffn_hidden_size=14336, vocab_size=128256, seq_length=8192, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3-70b": dict(_LLAMA, num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                       ffn_hidden_size=28672, vocab_size=128256, seq_length=8192, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "qwen2-7b": dict(_LLAMA, add_qkv_bias=True, num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                     ffn_hidden_size=18944, vocab_size=152064, seq_length=4096, max_position_embeddings=32768,
                     norm_eps=1e-6, rope_theta=1000000.0),
}


def resolve_preset(cfg: ModelConfig) -> ModelConfig:
    """Fill every field left at its unset value from the named preset."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {', '.join(sorted(PRESETS))}; got {cfg.preset!r}")
    preset = PRESETS[cfg.preset]
    unset = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key, value in preset.items():
        if getattr(cfg, key) == unset[key]:
            setattr(cfg, key, value)
    if not cfg.num_kv_heads:
        cfg.num_kv_heads = cfg.num_heads
    if not cfg.max_position_embeddings:
        cfg.max_position_embeddings = cfg.seq_length
    return cfg


def validate_model(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the key when the architecture cannot run at this TP size."""
    checks = [
        (cfg.hidden_size % cfg.num_heads == 0, "model.hidden_size", f"{cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}"),
        (cfg.num_heads % cfg.num_kv_heads == 0, "model.num_kv_heads", f"{cfg.num_kv_heads} does not divide model.num_heads={cfg.num_heads}"),
        (cfg.num_heads % tp == 0, "parallel.tp", f"{tp} does not divide model.num_heads={cfg.num_heads}"),
        (cfg.num_kv_heads % tp == 0, "parallel.tp", f"{tp} does not divide model.num_kv_heads={cfg.num_kv_heads}"),
        (cfg.ffn_hidden_size % tp == 0, "parallel.tp", f"{tp} does not divide model.ffn_hidden_size={cfg.ffn_hidden_size}"),
        (cfg.norm in ("layernorm", "rmsnorm"), "model.norm", f"must be layernorm or rmsnorm, got {cfg.norm!r}"),
        (cfg.activation in ("gelu", "swiglu"), "model.activation", f"must be gelu or swiglu, got {cfg.activation!r}"),
        (cfg.position_embedding in ("learned", "rope"), "model.position_embedding", f"must be learned or rope, got {cfg.position_embedding!r}"),
        (cfg.attention_backend in ATTENTION_BACKENDS, "model.attention_backend", f"must be {', '.join(ATTENTION_BACKENDS[:-1])} or {ATTENTION_BACKENDS[-1]}; got {cfg.attention_backend!r}"),
        (cfg.recompute in ("none", "full"), "model.recompute", f"must be none or full, got {cfg.recompute!r}"),
        (cfg.seq_length <= cfg.max_position_embeddings, "model.seq_length", f"{cfg.seq_length} exceeds model.max_position_embeddings={cfg.max_position_embeddings}"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ValueError(f"{key}: {message}")
