"""Hugging Face conversion: random tiny models of each family give HF's logits from our model
at TP=2, and HF -> Trellis -> HF returns byte-identical tensors."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.distributed import run_distributed  # noqa: E402
from tools.convert_checkpoint import main as convert  # noqa: E402

VOCAB = 300  # not a multiple of 128, so vocabulary padding is exercised
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_SHAPE, rope_theta=500000.0),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_SHAPE, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SHAPE, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def safetensors_tensors(directory: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (hf dir, trellis dir, HF logits)}; the llama model is saved in several shards."""
    result = {}
    for family, make_config in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        torch.manual_seed(11)
        model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
        with torch.no_grad():
            # HF zero-initialises biases; random ones make the bias mapping matter.
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.02)
            logits = model(TOKENS).logits.float()
        shard_size = "100KB" if family == "llama" else "50MB"
        model.save_pretrained(root / "hf", max_shard_size=shard_size)
        assert convert(["hf-to-trellis", "--hf", str(root / "hf"), "--out", str(root / "trellis"), "--tp", "2"]) == 0
        result[family] = (str(root / "hf"), str(root / "trellis"), logits)
    return result


def trellis_logits(checkpoints: dict) -> dict:
    """Full-vocabulary logits [b, s, vocab] of each converted checkpoint at this layout."""
    import yaml

    from engine.config import validate
    from engine.training import Trainer, shutdown
    from parallel import comm
    from tests.training_harness import tiny_config

    results = {}
    for family, directory in checkpoints.items():
        with open(os.path.join(directory, "model.yaml")) as handle:
            model = yaml.safe_load(handle)["model"]
        cfg = tiny_config({"model": model, "parallel": {"tp": 2}, "checkpoint": {"load": directory}})
        trainer = Trainer(validate(cfg, int(os.environ["WORLD_SIZE"])))
        trainer.model.eval()
        with torch.no_grad():
            local = trainer.model(TOKENS)  # [s, b, padded vocab / tp]
            full = comm.all_gather_dim(local.contiguous(), trainer.grid.tp_group, -1)
        results[family] = full.transpose(0, 1)[:, :, :VOCAB]
    shutdown()
    return results


def test_our_model_at_tp2_gives_hf_logits(converted):
    ours = run_distributed(trellis_logits, 2, {f: c[1] for f, c in converted.items()})
    for family, (_, _, hf_logits) in converted.items():
        for rank in ours:
            torch.testing.assert_close(rank[family], hf_logits, rtol=0, atol=1e-4, msg=family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_byte_identical(family, converted, tmp_path):
    hf_dir, trellis_dir, hf_logits = converted[family]
    assert convert(["trellis-to-hf", "--ckpt", trellis_dir, "--out", str(tmp_path)]) == 0
    original, exported = safetensors_tensors(hf_dir), safetensors_tensors(str(tmp_path))
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        assert exported[name].numpy().tobytes() == tensor.numpy().tobytes(), name
    if family == "llama":
        index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
        assert len(set(index["weight_map"].values())) > 1, "the sharded-input path was not exercised"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, hf_logits, rtol=0, atol=1e-5)


def test_bad_inputs_fail_with_one_sentence(converted, tmp_path, capsys):
    hf_dir = converted["llama"][0]
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    broken = tmp_path / "missing_shard"
    os.makedirs(broken)
    for name in os.listdir(hf_dir):
        if name != sorted(set(index["weight_map"].values()))[0]:
            os.symlink(os.path.join(hf_dir, name), broken / name)
    assert convert(["hf-to-trellis", "--hf", str(broken), "--out", str(tmp_path / "out1")]) == 2
    assert "is missing" in capsys.readouterr().err

    gpt2_hf = converted["gpt2"][0]
    truncated = tmp_path / "truncated"
    os.makedirs(truncated)
    os.symlink(os.path.join(gpt2_hf, "config.json"), truncated / "config.json")
    data = open(os.path.join(gpt2_hf, "model.safetensors"), "rb").read()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert convert(["hf-to-trellis", "--hf", str(truncated), "--out", str(tmp_path / "out2")]) == 2
    assert "truncated" in capsys.readouterr().err

    unknown = tmp_path / "unknown"
    os.makedirs(unknown)
    (unknown / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    assert convert(["hf-to-trellis", "--hf", str(unknown), "--out", str(tmp_path / "out3")]) == 2
    assert "unknown Hugging Face architecture ['FalconForCausalLM']" in capsys.readouterr().err

    other_shape = tmp_path / "other_shape"
    os.makedirs(other_shape)
    config = json.load(open(os.path.join(gpt2_hf, "config.json")))
    (other_shape / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    os.symlink(os.path.join(gpt2_hf, "model.safetensors"), other_shape / "model.safetensors")
    assert convert(["hf-to-trellis", "--hf", str(other_shape), "--out", str(tmp_path / "out4")]) == 2
    assert "lacks transformer.h.2" in capsys.readouterr().err
