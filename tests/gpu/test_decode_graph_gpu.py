"""CUDA-graph decode steps (engine/decode_graph.py) against the same static-decode cache run
eagerly: the same tokens in every sampling mode, with left padding and an EOS stop, after the
weights changed in place (a policy between rollouts) and at another batch size. Also with
LoRA adapters over NF4 weights (QLoRA's policy), and at head layouts the decode-attention
kernels take (csrc/decode_attention.cu with one kv head a query head,
decode_attention_grouped.cu with two; the replays and the eager static steps both run them).
The static cache itself is checked against the sliced one on the CPU (tests/test_generation.py).
Run on a CUDA machine:
`python3 -m pytest tests/gpu/test_decode_graph_gpu.py -q`."""
import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 17, 99, 3, 250], [7, 7], [400, 12, 30, 1, 2, 3, 4, 5, 6], [9] * 14]
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_p=0.9)]


def build(preset: str, adapters: bool, overrides: dict):
    from engine.generation import TextGenerator
    from engine.inference import build_chunks
    from engine.precision import autocast_context
    from models.config import ModelConfig, resolve_preset
    from parallel.grid import build_grid, init_distributed
    from parallel.lora import apply_lora
    from parallel.nf4 import enable_nf4
    from parallel.random import RNGTracker

    device = init_distributed("cuda", 120)
    grid = build_grid(1, 1, device=device)
    cfg = resolve_preset(ModelConfig(preset=preset, **overrides))
    rng = RNGTracker(device)
    rng.seed(0, 0, 0)
    chunks = build_chunks(cfg, grid, rng, device, torch.bfloat16, seed=11)
    if adapters:
        enable_nf4(chunks[0])
        apply_lora(chunks[0], ["layers.*.attn.qkv", "layers.*.mlp.fc2"], rank=4, alpha=8)
        with torch.no_grad():
            for name, param in chunks[0].named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)  # B starts at zero: make the adapters count
    for chunk in chunks:
        chunk.eval()
    autocast = autocast_context("bf16", device)
    return (TextGenerator(chunks, grid, device, autocast, decode="auto"),
            TextGenerator(chunks, grid, device, autocast, decode="static"))


def outputs(generator, prompts=PROMPTS) -> list:
    from parallel.vocab_sampling import SamplingParams

    runs = [generator.generate(prompts, 12, SamplingParams(**p), seed=7).tokens for p in SAMPLING]
    eos = runs[0][0, -8].item()
    runs.append(generator.generate(prompts, 12, SamplingParams(), eos_id=eos, pad_id=0, seed=7).tokens)
    return [t.tolist() for t in runs]


def graph_checks(preset: str, adapters: bool, overrides: dict):
    graphed, static = build(preset, adapters, overrides)
    assert graphed.graphs and not static.graphs
    first = outputs(graphed)
    assert first == outputs(static), "graph replays differ from the same steps run eagerly"
    with torch.no_grad():  # an optimizer step between rollouts
        for param in graphed.chunks[0].parameters():
            param.add_(torch.randn_like(param), alpha=0.02)
    updated = outputs(graphed)
    assert updated != first and updated == outputs(static), "the replays must use the updated weights"
    fewer = PROMPTS[:3]
    assert outputs(graphed, fewer) == outputs(static, fewer), "another batch size"
    return True


# Head dim 64 (hidden 256 over 4 heads) is what the decode-attention kernels take, with one kv
# head a query head or two (the grouped kernel); the tiny presets' head dim 16 takes the torch
# reference.
@pytest.mark.parametrize("preset,adapters,overrides", [
    ("tiny", False, {}), ("tiny-gpt2", False, {}), ("tiny", True, {}), ("tiny", False, dict(hidden_size=256, num_kv_heads=4)),
    ("tiny", False, dict(hidden_size=256, num_kv_heads=2)), ("tiny-gpt2", False, dict(hidden_size=256))],
    ids=["rope-gqa", "learned-positions", "lora-over-nf4", "rope-decode-kernel", "rope-gqa-decode-kernel",
         "learned-positions-decode-kernel"])
def test_decode_graph_matches_eager_static_cache(preset, adapters, overrides):
    assert run_distributed(graph_checks, 1, preset, adapters, overrides) == [True]
