"""Reference training steps that Trellis is measured against, built from the same ModelConfig:
a plain-PyTorch Llama (eager or torch.compile) and Hugging Face `LlamaForCausalLM`. Each uses
fp32 weights, bf16 autocast, SDPA attention and torch's fused AdamW: what a careful user writes
without a training engine."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class PlainBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.norm1, self.norm2 = PlainRMSNorm(h, cfg.norm_eps), PlainRMSNorm(h, cfg.norm_eps)
        self.qkv = nn.Linear(h, h + 2 * cfg.num_kv_heads * d, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * cfg.ffn_hidden_size, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split((self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                                 self.kv_heads * self.head_dim), dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _rope(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class PlainLlama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens, labels):
        d, s = self.cfg.head_dim(), tokens.shape[1]
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, device=tokens.device).float() / d))
        freqs = torch.outer(torch.arange(s, device=tokens.device).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def hf_llama(cfg, dtype=None):
    """LlamaForCausalLM of `cfg`, wrapped to return the loss. Its weights are created in `dtype`
    (fp32 by default) as `from_pretrained(dtype=...)` does, not in fp32 and then cast: no fp32
    copy is ever held, and the rotary inverse frequencies stay fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default_dtype)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens, labels):
            return self.inner(input_ids=tokens, labels=labels).loss

    return Wrapped()


# Trellis LoRA target aliases -> Hugging Face Llama module names.
HF_LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                   "down": "down_proj"}


def hf_lora_llama(cfg, targets, rank: int, alpha: float, device):
    """Hugging Face LlamaForCausalLM with bf16 weights (built on `device`: no copy on the host)
    and a PEFT LoRA adapter on the aliased projections; PEFT keeps the adapters in fp32."""
    with torch.device(device):
        wrapped = hf_llama(cfg, torch.bfloat16)
    return _add_peft_lora(wrapped, targets, rank, alpha)


def hf_qlora_llama(cfg, targets, rank: int, alpha: float, device):
    """The QLoRA recipe in Hugging Face: LlamaForCausalLM with bf16 weights whose decoder-layer
    linears (all seven projections) are bitsandbytes NF4, double-quantised, blocksize 64, bf16
    compute (what `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16))`
    builds), non-reentrant gradient checkpointing of every layer, and a PEFT LoRA adapter on
    the aliased projections. With random weights there is no checkpoint to load: the model is
    built in bf16 on `device` and each projection is quantised there in turn (its bf16 weight
    freed as it goes), so the whole bf16 model is held once, during the build. The embedding,
    norms and output layer stay bf16 and frozen, as in Trellis: PEFT's
    `prepare_model_for_kbit_training` would make them fp32."""
    import bitsandbytes as bnb

    with torch.device(device):
        wrapped = hf_llama(cfg, torch.bfloat16)
    model = wrapped.inner
    names = set(HF_LORA_MODULES.values())
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name not in names:
                    continue
                nf4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,  # Llama has none
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                # Moving a Params4bit to a device quantises it (to the CPU as well as to a GPU).
                nf4.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=True, blocksize=64, module=nf4).to(device)
                setattr(parent, name, nf4)
    model.is_loaded_in_4bit = True  # as from_pretrained sets it: PEFT then wraps in its bitsandbytes LoRA layer
    model.config.use_cache = False
    # Non-reentrant checkpointing needs no input that requires grad; transformers enables it anyway.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _add_peft_lora(wrapped, targets, rank, alpha)


def _add_peft_lora(wrapped, targets, rank: int, alpha: float):
    """Wrap `wrapped.inner` in PEFT LoRA (no dropout, no bias) on the aliased projections;
    PEFT freezes every other parameter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=[HF_LORA_MODULES[t] for t in targets])
    wrapped.inner = get_peft_model(wrapped.inner, config)
    return wrapped


def build_baseline(name: str, cfg, device):
    """A model whose forward(tokens, labels) returns the mean loss."""
    model = (hf_llama(cfg) if name == "hf" else PlainLlama(cfg)).to(device)
    if name == "plain-compile":
        model = torch.compile(model)
    return model


def baseline_step_fn(model, device, accumulation: int = 1):
    """One optimizer step over `accumulation` micro-batches (the same one each time: this is for
    timing), the loss of each divided by their number as gradient accumulation does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(tokens, labels):
        for _ in range(accumulation):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(tokens, labels) / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step
