"""Generation: the KV cache gives the tokens of recomputing the whole sequence each step; a
left-padded batch gives each prompt's tokens alone; EOS stops a row; TP=2 and PP=2 (with
interleaved stages) generate what one process does, greedy and sampled; the vocab-parallel
sampler equals sampling from the gathered logits."""
import functools

import pytest
import torch

from tests.data.conftest import sp_model_path  # noqa: F401 (fixture)
from tests.distributed import run_distributed

PROMPTS = [[5, 17, 99, 3, 250], [7, 7], [400, 12, 30, 1, 2, 3, 4, 5, 6]]
SAMPLING = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=1.0),
            "top_k": dict(temperature=0.8, top_k=5), "top_p": dict(temperature=1.0, top_p=0.9),
            "top_k_top_p": dict(temperature=1.0, top_k=20, top_p=0.7)}


def build_generator(preset: str, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False, decode: str = "auto"):
    from engine.generation import TextGenerator
    from engine.inference import build_chunks
    from models.config import ModelConfig, resolve_preset
    from parallel.grid import build_grid, init_distributed
    from parallel.random import RNGTracker

    device = init_distributed("cpu", 120)
    grid = build_grid(tp, pp, device=device)
    cfg = resolve_preset(ModelConfig(preset=preset))
    rng = RNGTracker(device)
    rng.seed(0, grid.tp_rank, grid.pp_rank)
    chunks = build_chunks(cfg, grid, rng, device, torch.float32, seed=11, vpp=vpp)
    if sp:  # a model built for sequence parallelism generates with it switched off
        for chunk in chunks:
            for module in chunk.modules():
                if hasattr(module, "sequence_parallel"):
                    module.sequence_parallel = True
    return TextGenerator(chunks, grid, device, decode=decode)


def generations(preset: str, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False, decode: str = "auto") -> dict:
    """Token lists of each sampling mode (cached, left-padded batch) on this layout, and of a
    greedy run stopped by an EOS that one row produces early."""
    from parallel.vocab_sampling import SamplingParams

    generator = build_generator(preset, tp, pp, vpp, sp, decode)
    out = {}
    for name, params in SAMPLING.items():
        result = generator.generate(PROMPTS, 10, SamplingParams(**params), seed=3)
        out[name] = result.tokens.tolist()
    eos = out["greedy"][0][-7]
    out["eos"] = generator.generate(PROMPTS, 10, SamplingParams(), eos_id=eos, seed=3).tokens.tolist()
    return out


def serial_checks(preset: str) -> dict:
    """Cache vs no cache, batch vs alone, EOS handling, at one process."""
    from parallel.vocab_sampling import SamplingParams

    generator = build_generator(preset)
    greedy = SamplingParams()
    cached = generator.generate(PROMPTS, 12, greedy)
    uncached = generator.generate(PROMPTS, 12, greedy, use_cache=False)
    alone = [generator.generate([p], 12, greedy).response_lists()[0] for p in PROMPTS]
    sampled = [generator.generate(PROMPTS, 12, SamplingParams(temperature=1.0), seed=5, use_cache=c).tokens.tolist()
               for c in (True, False)]
    eos = cached.responses[0, 4].item()  # the 5th token of row 0 becomes the end of sequence
    stopped = generator.generate(PROMPTS, 12, greedy, eos_id=eos, pad_id=0)
    return {"cached": cached.response_lists(), "uncached": uncached.response_lists(), "alone": alone,
            "sampled": sampled, "eos": eos, "stopped": stopped.response_lists(), "stopped_tokens": stopped.responses.tolist(),
            "full": cached.responses.tolist(), "mask": stopped.response_mask.tolist()}


def serial_checks_both_presets() -> list:
    return [serial_checks("tiny"), serial_checks("tiny-gpt2")]  # RoPE with GQA; learned positions


@pytest.mark.parametrize("preset", [0, 1])
def test_cache_padding_and_eos_at_one_process(preset):
    r = serial_results()[preset]
    assert r["cached"] == r["uncached"], "KV-cache greedy tokens differ from full recomputation"
    assert r["cached"] == r["alone"], "a left-padded batch differs from its prompts run alone"
    assert r["sampled"][0] == r["sampled"][1], "seeded sampling differs with and without the cache"
    assert len({tuple(row) for row in r["cached"]}) == 3 and all(len(row) == 12 for row in r["cached"])
    first = r["full"][0]
    stop = first.index(r["eos"])  # the EOS may occur before the 5th position too
    assert r["stopped"][0] == first[:stop + 1], "a row must stop right after its EOS"
    assert r["stopped_tokens"][0][stop + 1:] == [0] * (11 - stop), "positions after EOS hold the pad id"
    assert r["mask"][0] == [True] * (stop + 1) + [False] * (11 - stop)
    for row in (1, 2):  # the other rows go on unless they produce the EOS themselves
        expected = r["full"][row][:r["full"][row].index(r["eos"]) + 1] if r["eos"] in r["full"][row] else r["full"][row]
        assert r["stopped"][row] == expected


@functools.lru_cache(maxsize=None)
def serial_results() -> list:
    return run_distributed(serial_checks_both_presets, 1)[0]


@functools.lru_cache(maxsize=None)
def serial_generations(preset: str, decode: str = "auto") -> dict:
    return run_distributed(generations, 1, preset, 1, 1, 1, False, decode)[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_static_decode_cache_matches_sliced_cache(preset):
    """The cache a CUDA graph replays (keys written at a device-held position, attention over
    the whole length under a mask) generates what the sliced cache does: every sampling mode,
    left padding, a row stopped by EOS (on the CPU, without the graph itself)."""
    assert serial_generations(preset, "static") == serial_generations(preset, "eager")


def test_decode_graphs_only_where_they_apply():
    run_distributed(decode_graph_conditions, 1)


def test_decode_attention_kernel_head_layouts():
    """Which head layouts the decode-attention kernels take (the rest, and every CPU tensor,
    run the torch reference): one kv head a query head at head dim 64/128/256, 2..8 query heads
    a kv head at 64/128."""
    from csrc import loader

    for heads, kv_heads, dim in [(16, 16, 64), (16, 16, 128), (8, 8, 256), (32, 8, 128), (28, 4, 128), (8, 1, 64),
                                 (6, 2, 64)]:
        assert loader.decode_heads_supported(heads, kv_heads, dim), (heads, kv_heads, dim)
    for heads, kv_heads, dim in [(16, 16, 96), (32, 8, 256), (32, 2, 128), (12, 8, 128), (8, 0, 64)]:
        assert not loader.decode_heads_supported(heads, kv_heads, dim), (heads, kv_heads, dim)
    q = torch.zeros(2, 32, 1, 128, dtype=torch.bfloat16)
    assert not loader.decode_attention_supported(q, torch.zeros(2, 8, 16, 128, dtype=torch.bfloat16))


def decode_graph_conditions():
    """Graphs need CUDA, one TP and PP rank and no FP8 linear (also none under a LoRA wrapper)."""
    from engine.decode_graph import graphable
    from engine.generation import TextGenerator
    from parallel.fp8 import enable_fp8
    from parallel.lora import apply_lora

    generator = build_generator("tiny")
    chunks, grid = generator.chunks, generator.grid
    assert generator.decode == "auto" and not generator.graphs  # on the CPU
    with pytest.raises(ValueError, match="decode must be one of"):
        TextGenerator(chunks, grid, generator.device, decode="graph")
    cuda = torch.device("cuda")  # graphable() reads only the device type
    assert graphable(chunks, grid, cuda)
    enable_fp8(chunks[0].layers["0"].attn.qkv)
    assert not graphable(chunks, grid, cuda)
    apply_lora(chunks[0], ["layers.*.attn.qkv"], rank=2, alpha=4)  # the FP8 function becomes LoRA's base
    assert not graphable(chunks, grid, cuda)


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2_vpp2"])
def test_parallel_generation_matches_one_process(layout):
    # (tp, pp, vpp, sp) on 2 ranks
    layout_args = {"tp2_sp": (2, 1, 1, True), "pp2_vpp2": (1, 2, 2, False)}[layout]
    serial = serial_generations("tiny")
    assert len({str(serial[name]) for name in SAMPLING}) == len(SAMPLING), "sampling modes should differ"
    for result in run_distributed(generations, 2, "tiny", *layout_args):
        assert result == serial


def test_vocab_parallel_sampler_matches_gathered_logits():
    """The sampler over TP slices picks what it picks over the whole vocabulary (one rank)."""
    run_distributed(sampler_against_full_vocab, 2)


def sampler_against_full_vocab():
    import torch.distributed as dist

    from parallel.grid import build_grid, init_distributed
    from parallel.vocab_sampling import SamplingParams, sample_vocab_parallel

    init_distributed("cpu", 120)
    grid = build_grid(2, 1)
    full = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    full[3, 10] = full[3, 200] = full[3].max() + 1  # a tie across ranks goes to the lower id
    local = full.chunk(2, dim=-1)[grid.tp_rank]
    one = dist.new_group([dist.get_rank()])
    for params in [SamplingParams(**p) for p in SAMPLING.values()]:
        split = sample_vocab_parallel(local, grid.tp_group, grid.tp_rank * 128, 250, params, torch.Generator().manual_seed(4))
        whole = sample_vocab_parallel(full, one, 0, 250, params, torch.Generator().manual_seed(4))
        assert torch.equal(split, whole), params
        assert (split < 250).all(), "padded vocabulary rows must never be drawn"
    greedy = sample_vocab_parallel(local, grid.tp_group, grid.tp_rank * 128, 250, SamplingParams())
    assert greedy[3].item() == 10


def generate_tool_against_trainer(tokenizer_path: str, ckpt: str):
    """Train one step and save; tools/generate.py on that checkpoint prints what the trainer's
    own model generates."""
    from engine.config import validate
    from engine.data.tokenizer import build_tokenizer
    from engine.generation import TextGenerator
    from engine.training import Trainer
    from tests.training_harness import tiny_config
    from tools import generate as tool

    cfg = validate(tiny_config({"train": {"iters": 1}, "checkpoint": {"save": ckpt}}), 1)
    trainer = Trainer(cfg)
    trainer.train()
    tokenizer = build_tokenizer("sentencepiece", tokenizer_path)
    prompts = ["import json", "def"]
    args = tool.parse_args(["--ckpt", ckpt, "--tokenizer", tokenizer_path, "--prompt", prompts[0],
                            "--prompt", prompts[1], "--max-new-tokens", "6", "--device", "cpu"])
    pairs = tool.generate(args)
    direct = TextGenerator(trainer.model_chunks, trainer.grid, trainer.device).generate(
        [tokenizer.encode(p) for p in prompts], 6, eos_id=tokenizer.eod_id, pad_id=tokenizer.pad_id,
        vocab_limit=tokenizer.vocab_size)
    expected = [tokenizer.decode([t for t in row if t != tokenizer.eod_id]) for row in direct.response_lists()]
    return [c for _, c in pairs], expected


def test_generate_tool_loads_a_checkpoint(sp_model_path, tmp_path):  # noqa: F811
    printed, expected = run_distributed(generate_tool_against_trainer, 1, sp_model_path, str(tmp_path))[0]
    assert printed == expected and any(printed)
