"""Hugging Face <-> Trellis: config fields and tensor names/shapes per model family.

Trellis tensors are named by their checkpoint keys (engine/checkpoint_state.py): fused blocks
are stored apart (`attn.qkv.weight.q`, `mlp.fc1.weight.gate`), so Llama-style q/k/v and
gate/up projections map one to one. Conventions that make the weights interchangeable:
RoPE is rotate-half in both (HF checkpoints are already permuted for it), RMSNorm computes in
fp32 and multiplies by the weight in fp32 (HF casts back to the input dtype before the weight
multiply: the same in fp32, a rounding apart in bf16), GPT-2 uses the tanh GELU ("gelu_new").
GPT-2's Conv1D stores weights as [in, out] (transposed) and fuses q, k, v in `c_attn`. The
Trellis vocabulary is padded to a multiple of 128: padded rows are zero on import and dropped
on export.
"""
from __future__ import annotations

import dataclasses

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2"}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}
# HF tensors that are buffers or duplicates, not weights of their own.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class MappingError(ValueError):
    """An HF model this mapping cannot represent exactly; one sentence."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str
    keys: tuple  # Trellis checkpoint keys, stacked along dim 0 (after the transpose) in order
    transpose: bool = False  # GPT-2 Conv1D: HF stores [in, out]
    vocab: bool = False  # rows are the (padded) vocabulary


def family_of(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    if model_type in FAMILY_ARCHITECTURE:
        return model_type
    raise MappingError(f"unknown Hugging Face architecture {archs or model_type!r}; supported: "
                       f"{', '.join(sorted(ARCHITECTURES))}")


# ---- configs ------------------------------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise MappingError(f"RoPE scaling {kind!r} is not supported by the Trellis model")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise MappingError(message)


def model_fields_from_hf(hf: dict) -> tuple:
    """(family, ModelConfig fields) of an HF config.json."""
    family = family_of(hf)
    if family == "gpt2":
        _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                 f"GPT-2 activation {hf.get('activation_function')!r} is not the tanh GELU Trellis uses")
        _require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
                 "GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        hidden = hf["n_embd"]
        return family, dict(
            num_layers=hf["n_layer"], hidden_size=hidden, num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["n_positions"], seq_length=min(hf["n_positions"], 2048),
            norm="layernorm", activation="gelu", position_embedding="learned", rope_theta=10000.0,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), add_bias_linear=True, add_qkv_bias=True,
            tie_embeddings=True)
    heads = hf["num_attention_heads"]
    _require(hf.get("hidden_act", "silu") == "silu", f"activation {hf.get('hidden_act')!r} is not SwiGLU's silu")
    _require(not hf.get("attention_bias") and not hf.get("mlp_bias"),
             "attention_bias/mlp_bias on a Llama-style model is not supported (only Qwen2's QKV bias)")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    _require(head_dim * heads == hf["hidden_size"], f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    max_positions = hf["max_position_embeddings"]
    return family, dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_position_embeddings=max_positions, seq_length=min(max_positions, 2048),
        norm="rmsnorm", activation="swiglu", position_embedding="rope", rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), add_bias_linear=False, add_qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def infer_family(model: dict) -> str:
    if model["position_embedding"] == "learned":
        return "gpt2"
    return "qwen2" if model["add_qkv_bias"] else "llama"


def hf_config_kwargs(family: str, model: dict) -> dict:
    """Keyword arguments of the transformers config class for a Trellis model config."""
    if family == "gpt2":
        _require(model["position_embedding"] == "learned" and model["norm"] == "layernorm",
                 "only a GPT-2-style model (LayerNorm, learned positions) exports as gpt2")
        return dict(n_layer=model["num_layers"], n_embd=model["hidden_size"], n_head=model["num_heads"],
                    n_inner=model["ffn_hidden_size"], vocab_size=model["vocab_size"],
                    n_positions=model["max_position_embeddings"], layer_norm_epsilon=model["norm_eps"],
                    activation_function="gelu_new", tie_word_embeddings=True)
    _require(model["position_embedding"] == "rope" and model["activation"] == "swiglu",
             f"only a Llama-style model (RMSNorm, SwiGLU, RoPE) exports as {family}")
    _require(family == "qwen2" or not model["add_qkv_bias"], f"a model with QKV bias exports as qwen2, not {family}")
    return dict(num_hidden_layers=model["num_layers"], hidden_size=model["hidden_size"],
                num_attention_heads=model["num_heads"], num_key_value_heads=model["num_kv_heads"],
                intermediate_size=model["ffn_hidden_size"], vocab_size=model["vocab_size"],
                max_position_embeddings=model["max_position_embeddings"], rms_norm_eps=model["norm_eps"],
                rope_theta=model["rope_theta"], tie_word_embeddings=bool(model["tie_embeddings"]),
                hidden_act="silu")


# ---- tensors ------------------------------------------------------------------------------------
def _llama_layer(i: int, qkv_bias: bool) -> list:
    hf, ours = f"model.layers.{i}.", f"model.layers.{i}."
    maps = [TensorMap(hf + "input_layernorm.weight", (ours + "norm1.weight",)),
            TensorMap(hf + "post_attention_layernorm.weight", (ours + "norm2.weight",)),
            TensorMap(hf + "self_attn.o_proj.weight", (ours + "attn.proj.weight",)),
            TensorMap(hf + "mlp.gate_proj.weight", (ours + "mlp.fc1.weight.gate",)),
            TensorMap(hf + "mlp.up_proj.weight", (ours + "mlp.fc1.weight.up",)),
            TensorMap(hf + "mlp.down_proj.weight", (ours + "mlp.fc2.weight",))]
    for proj in "qkv":
        maps.append(TensorMap(f"{hf}self_attn.{proj}_proj.weight", (f"{ours}attn.qkv.weight.{proj}",)))
        if qkv_bias:
            maps.append(TensorMap(f"{hf}self_attn.{proj}_proj.bias", (f"{ours}attn.qkv.bias.{proj}",)))
    return maps


def _gpt2_layer(i: int) -> list:
    hf, ours = f"transformer.h.{i}.", f"model.layers.{i}."
    qkv = lambda kind: tuple(f"{ours}attn.qkv.{kind}.{p}" for p in "qkv")  # noqa: E731
    maps = [TensorMap(hf + "attn.c_attn.weight", qkv("weight"), transpose=True),
            TensorMap(hf + "attn.c_attn.bias", qkv("bias"))]
    for hf_part, our_part in (("ln_1", "norm1"), ("ln_2", "norm2")):
        maps += [TensorMap(f"{hf}{hf_part}.{p}", (f"{ours}{our_part}.{p}",)) for p in ("weight", "bias")]
    for hf_part, our_part in (("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        maps += [TensorMap(f"{hf}{hf_part}.weight", (f"{ours}{our_part}.weight",), transpose=True),
                 TensorMap(f"{hf}{hf_part}.bias", (f"{ours}{our_part}.bias",))]
    return maps


def tensor_maps(family: str, model: dict) -> list:
    """Every tensor of the HF checkpoint with the Trellis keys it becomes."""
    layers = range(model["num_layers"])
    if family == "gpt2":
        maps = [TensorMap("transformer.wte.weight", ("model.embedding.weight",), vocab=True),
                TensorMap("transformer.wpe.weight", ("model.position_embedding",))]
        maps += [m for i in layers for m in _gpt2_layer(i)]
        return maps + [TensorMap("transformer.ln_f.weight", ("model.final_norm.weight",)),
                       TensorMap("transformer.ln_f.bias", ("model.final_norm.bias",))]
    maps = [TensorMap("model.embed_tokens.weight", ("model.embedding.weight",), vocab=True)]
    maps += [m for i in layers for m in _llama_layer(i, model["add_qkv_bias"])]
    maps.append(TensorMap("model.norm.weight", ("model.final_norm.weight",)))
    if not model["tie_embeddings"]:
        maps.append(TensorMap("lm_head.weight", ("model.output_weight",), vocab=True))
    return maps


def is_ignorable(hf_name: str, model: dict) -> bool:
    """HF tensors with no Trellis counterpart that carry no information of their own."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return True
    return hf_name == "lm_head.weight" and bool(model["tie_embeddings"])
