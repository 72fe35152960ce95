"""`model.cuda_graphs true` against the eager layers on GPUs: the same losses, gradient norms
and per-parameter gradients over training steps with gradient accumulation (so the graphs
read the weights each optimizer step writes), with SDPA and with Transformer Engine's attention
(where it imports), with fp16 loss scaling, with LoRA and QLoRA adapters, with packed documents
(a different layout every micro-batch, so the mask built inside the graphs must follow the ids
copied in), and a second forward before the first one's backward (the graphs hold one
micro-batch, so it must run eagerly and stay correct).
Run on a CUDA machine: `python3 -m pytest tests/gpu/test_layer_graphs_gpu.py -q`."""
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.gpu.test_elementwise_kernels import positions_restarting_at
from tests.training_harness import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPE = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 704, "vocab_size": 1024,
         "seq_length": 128, "num_layers": 3}
ALL_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
CASES = {
    "bf16": ({}, 1),
    "fp8": ({"train": {"precision": "fp8"}}, 1),
    "fp8-row": ({"train": {"precision": "fp8", "fp8_scaling": "row"}}, 1),
    "compiled-layers": ({"model": {"compile": True}}, 1),
    "frozen-embedding-and-layer-0": ({"train": {"freeze": ["embedding.*", "layers.0.*"]}}, 1),
    "fp16-loss-scaling": ({"train": {"precision": "fp16"}}, 1),
    "lora": ({"finetune": {"method": "lora", "lora_targets": ALL_LINEARS}}, 1),
    "qlora": ({"finetune": {"method": "qlora", "lora_targets": ALL_LINEARS}}, 1),
    "te-attention": ({"model": {"attention_backend": "te"}}, 1),
    "te-attention-compiled-layers": ({"model": {"attention_backend": "te", "compile": True}}, 1),
    "tp2-sp": ({"parallel": {"tp": 2, "sp": True}}, 2),
    "dp2-sharded-overlapped": ({"optim": {"shard": True, "overlap_param_gather": True}}, 2),
}


def _te_missing() -> bool:
    from models import te_attention

    return te_attention.import_te()[0] is None


def _overrides(case_overrides: dict, graphs: bool) -> dict:
    base = {"model": {**SHAPE, "cuda_graphs": graphs},
            "train": {"device": "cuda", "precision": "bf16", "iters": 3, "micro_batch_size": 2, "global_batch_size": 8}}
    for section, values in case_overrides.items():
        base.setdefault(section, {}).update(values)
    return base


def _main_grads(model) -> dict:
    return {name: p.main_grad.float().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _packed_layout(seq: int, seed: int) -> tuple:
    """(document_ids, position_ids) [seq] of one row: 1-4 documents at random cut points, the
    first starting at id 0 or 1 (as left padding does), positions restarting at each."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq - 1, generator=g)[: int(torch.randint(0, 4, (1,), generator=g))] + 1
    starts = torch.zeros(seq, dtype=torch.long)
    starts[cuts] = 1
    document_ids = starts.cumsum(0) + int(torch.randint(0, 2, (1,), generator=g))
    return document_ids, positions_restarting_at(starts.bool())


def _with_packed_documents(trainer) -> None:
    """Give every micro-batch the trainer loads its own document layout (the same in every run)."""
    load, counter = trainer.train_microbatches, iter(range(10**6))

    def packed(global_batch):
        batches = load(global_batch)
        for batch in batches:
            rows, seq = batch["tokens"].shape
            layouts = [_packed_layout(seq, 1000 * next(counter) + r) for r in range(rows)]
            for key, index in (("document_ids", 0), ("position_ids", 1)):
                batch[key] = torch.stack([layout[index] for layout in layouts]).to(batch["tokens"].device)
        return batches
    trainer.train_microbatches = packed


def _run(overrides: dict, documents: bool = False) -> dict:
    from engine.config import validate
    from engine.training import shutdown, trainer_class

    cfg = validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"]))
    trainer = trainer_class("lm")(cfg)
    if documents:
        _with_packed_documents(trainer)
    records = [trainer.train_step() for _ in range(cfg.train.iters)]
    model = trainer.model_chunks[0]
    after_steps = _main_grads(model)
    # Two forwards, then both backwards: the second runs eagerly while the first owns the graphs.
    trainer.optimizer.zero_grad()
    trainer.optimizer.set_microbatches(2)
    batches = trainer.train_microbatches(2 * cfg.train.micro_batch_size * trainer.grid.dp)
    with trainer.autocast():
        losses = [model(b["tokens"], labels=b["labels"], loss_weights=b["loss_mask"] / b["loss_mask"].sum(),
                        position_ids=b.get("position_ids"), document_ids=b.get("document_ids"))
                  for b in batches]
    torch.stack(losses).sum().backward()
    two_forwards = _main_grads(model)
    captured = model.layer_graphs is not None and model.layer_graphs.graphs is not None
    shutdown()
    return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
            "after_steps": after_steps, "two_forwards": two_forwards, "captured": captured}


def _assert_grads_close(got: dict, expected: dict, what: str) -> None:
    for name, ref in expected.items():
        error = (got[name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert error < 2e-2, f"{what}: {name} main_grad differs by {error:.3g} (relative)"


def _compare(eager: list, graphed: list) -> None:
    for rank, (e, g) in enumerate(zip(eager, graphed)):
        assert g["captured"] and not e["captured"], "the graphed run must have captured the layers"
        torch.testing.assert_close(g["loss"], e["loss"], rtol=1e-3, atol=0)
        torch.testing.assert_close(g["grad_norm"], e["grad_norm"], rtol=1e-2, atol=0)
        _assert_grads_close(g["after_steps"], e["after_steps"], f"rank {rank}, after {len(e['loss'])} steps")
        _assert_grads_close(g["two_forwards"], e["two_forwards"], f"rank {rank}, two forwards then backwards")


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_layers_train_like_eager_layers(case):
    overrides, world = CASES[case]
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    if case.startswith("te-") and _te_missing():
        pytest.skip("needs transformer_engine")
    eager = run_distributed(_run, world, _overrides(overrides, False))
    graphed = run_distributed(_run, world, _overrides(overrides, True))
    _compare(eager, graphed)


PACKED_CASES = {
    "bf16": ({"model": {"attention_backend": "sdpa"}}, 1),
    "tp2-sp": ({"model": {"attention_backend": "sdpa"}, "parallel": {"tp": 2, "sp": True}}, 2),
}


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_graphed_layers_train_packed_documents_like_eager_layers(case):
    overrides, world = PACKED_CASES[case]
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    eager = run_distributed(_run, world, _overrides(overrides, False), True)
    graphed = run_distributed(_run, world, _overrides(overrides, True), True)
    _compare(eager, graphed)
