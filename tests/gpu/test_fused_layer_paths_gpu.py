"""GPU checks of the layer's fused paths against plain torch: the weight gradient accumulated
into fp32 main_grad by the GEMM (bf16 inputs), the residual add in the output projection's GEMM
and the stream's gradient in the norm's backward, the fused QKV split + RoPE (the CUDA kernel, or
the compiled function for per-sample positions; forward and the backward that writes the qkv
gradient), and the per-token losses whose backward
recomputes the logits. Run on a CUDA machine:
`python3 -m pytest tests/gpu/test_fused_layer_paths_gpu.py -q`."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from csrc import fused_ops, loader
from models.fused_elementwise import fused_split_qkv_rope, split_qkv_rope
from models.rope import rope_cache
from parallel import main_grad_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("with_autocast", [False, True])
@pytest.mark.parametrize("shape", [(512, 2, 1024, 3072), (128, 4, 2048, 2048), (64, 1, 640, 1920)])
def test_bf16_weight_grad_accumulates_into_fp32_main_grad(shape, with_autocast):
    s, b, fan_in, fan_out = shape
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.02)
    start = torch.randn(fan_out, fan_in, device="cuda")
    weight.main_grad = start.clone()
    assert main_grad_linear.fuses_into_main_grad(weight)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if with_autocast else contextlib.nullcontext()
    x = torch.randn(s, b, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(s, b, fan_out, device="cuda", dtype=torch.bfloat16)
    with autocast:
        y = main_grad_linear.linear(x, weight)
    y.backward(grad_out)
    assert weight.main_grad_filled
    expected = start + grad_out.reshape(-1, fan_out).float().t() @ x.detach().reshape(-1, fan_in).float()
    torch.testing.assert_close(weight.main_grad, expected, rtol=1e-4, atol=1e-3)
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, weight.detach()).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(y, F.linear(x.detach(), weight.detach()))


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(512, 2, 1024, 3072), (64, 1, 640, 1920), (8, 3, 2048, 2048)])
def test_residual_gemm_matches_product_and_add(shape, dtype):
    """residual + x @ w^T in one cuBLASLt GEMM: at least as close to the fp32 result as the
    product and add it replaces (which rounds twice)."""
    s, b, fan_in, fan_out = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(s, b, fan_in, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(fan_out, fan_in, device="cuda", generator=gen) * 0.02).to(dtype)
    residual = torch.randn(s, b, fan_out, device="cuda", generator=gen).to(dtype)
    assert loader.gemm_add_supported(x, weight, residual)
    got = loader.gemm_add(x, weight, residual)
    exact = residual.double() + x.double() @ weight.double().t()
    plain = residual + F.linear(x, weight)
    assert got.shape == residual.shape and got.dtype == dtype
    assert rel_err(got, exact) <= rel_err(plain, exact) * 1.01 + 1e-6 and rel_err(got, exact) < 1e-2
    # What it does not take: a residual view off the 16-byte grid, fp32, a shape mismatch.
    offset = torch.empty(residual.numel() + 1, device="cuda", dtype=dtype)[1:].view(residual.shape)
    assert not loader.gemm_add_supported(x, weight, offset)
    assert not loader.gemm_add_supported(x.float(), weight.float(), residual.float())
    assert not loader.gemm_add_supported(x, weight, residual[..., :8])


def test_layer_folds_its_residual_adds(monkeypatch):
    """A bf16 llama-style layer on one GPU: each output projection's GEMM adds the residual
    stream and each norm's backward adds the stream's gradient into dx; output and gradients
    match the same layer with the two adds done separately (its earlier form)."""
    from models.config import ModelConfig, resolve_preset
    from models.gpt import GPTModel
    from parallel.random import RNGTracker

    calls = {"gemm": 0, "norm": 0}
    gemm_add, norm_backward = loader.gemm_add, fused_ops._norm_backward_impl

    def counted_gemm(*args):
        calls["gemm"] += 1
        return gemm_add(*args)

    def counted_norm(*args):
        calls["norm"] += args[-1] is not None
        return norm_backward(*args)

    monkeypatch.setattr(loader, "gemm_add", counted_gemm)
    monkeypatch.setattr(fused_ops, "_norm_backward_impl", counted_norm)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        cfg = resolve_preset(ModelConfig(preset="tiny", hidden_size=512, num_heads=4, num_kv_heads=2,
                                         ffn_hidden_size=1408, seq_length=256))
        model = GPTModel(cfg, torch.distributed.group.WORLD, RNGTracker("cuda"), device="cuda", dtype=torch.bfloat16)
        model.init_weights(0)
        layer = model.layers["0"].train()
        params = [p for p in layer.parameters() if p.requires_grad]
        s, b = cfg.seq_length, 2
        rope = rope_cache(s, cfg.head_dim(), cfg.rope_theta, "cuda")
        x = torch.randn(s, b, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        grad_out = torch.randn_like(x)

        def run(forward):
            for p in params:  # the linears' weight gradients land in main_grad, the norms' in grad
                p.main_grad, p.grad, p.main_grad_filled = torch.zeros(p.shape, device="cuda"), None, False
            leaf = x.clone().requires_grad_(True)
            out = forward(leaf)
            out.backward(grad_out)
            return [out.detach(), leaf.grad] + [p.main_grad if p.main_grad_filled else p.grad for p in params]

        folded = run(lambda h: layer(h, rope))
        assert calls == {"gemm": 2, "norm": 2}

        def separate(h):
            h = h + layer.attn(layer.norm1(h), rope)
            return h + layer.mlp(layer.norm2(h))

        reference = run(separate)
        assert calls == {"gemm": 2, "norm": 2}
        for got, want in zip(folded, reference):
            assert rel_err(got, want) < 1e-2
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("heads,kv_heads,packed", [(16, 16, False), (8, 2, False), (8, 4, True)])
def test_compiled_split_qkv_rope_matches_eager(heads, kv_heads, packed):
    s, b, d = 256, 2, 128
    torch.manual_seed(1)
    qkv = torch.randn(s, b, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.randint(0, s, (b, s), device="cuda") if packed else None
    rope = rope_cache(s, d, 10000.0, "cuda", positions)
    got = fused_split_qkv_rope(qkv, rope, heads, kv_heads, d)
    ref_in = qkv.detach().clone().requires_grad_()
    ref = split_qkv_rope(ref_in, *rope, heads, kv_heads, d)
    grads = [torch.randn_like(t) for t in ref]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(ref, grads)
    # The compiled kernel rounds once where eager bf16 rounds after every op: compare both
    # with an fp32 computation, the compiled one at least as close.
    exact_in = qkv.detach().float().requires_grad_()
    exact = split_qkv_rope(exact_in, *rope, heads, kv_heads, d)
    torch.autograd.backward(exact, [g.float() for g in grads])
    for g, r, e in zip(got, ref, exact):
        assert g.stride() == r.stride()
        assert (g.float() - e).abs().max() <= (r.float() - e).abs().max() + 1e-6
        torch.testing.assert_close(g.float(), e, rtol=1.6e-2, atol=3e-2)
    torch.testing.assert_close(qkv.grad.float(), exact_in.grad, rtol=1.6e-2, atol=3e-2)


@pytest.mark.parametrize("sole_use", [False, True])
def test_bf16_token_losses_match_plain_logits_path(sole_use):
    """linear_token_losses (logits recomputed in backward) against bf16 logits + fp32
    cross-entropy, for a random per-token upstream gradient, as DPO and RL give it."""
    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_token_losses

    init_distributed("cuda")
    group = build_grid(tp=1).tp_group
    tokens, dim, vocab = 3000, 1024, 32000
    torch.manual_seed(2)
    hidden = (torch.randn(tokens, dim, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    weight = torch.nn.Parameter((torch.randn(vocab, dim, device="cuda") * 0.02).to(torch.bfloat16))
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    upstream = torch.randn(tokens, device="cuda")
    logits = torch.mm(hidden.detach().float(), weight.detach().float().t()).requires_grad_()
    hidden_ref = hidden.detach().clone().requires_grad_()
    expected = F.cross_entropy(logits, labels, reduction="none")
    (expected * upstream).sum().backward()
    hidden_ref_grad = logits.grad @ weight.detach().float()
    weight_ref_grad = logits.grad.t() @ hidden_ref.detach().float()
    if sole_use:
        weight.main_grad = torch.zeros(vocab, dim, device="cuda")
    token_loss = linear_token_losses(hidden, weight, labels, group, 0, vocab, sole_use=sole_use)
    (token_loss * upstream).sum().backward()
    torch.testing.assert_close(token_loss, expected.detach(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(hidden.grad.float(), hidden_ref_grad, rtol=2e-2, atol=2e-3)
    weight_grad = weight.main_grad if sole_use else weight.grad.float()
    # The logit gradients enter the weight GEMM in bf16 (as in training): one bf16 step of a
    # target's gradient (up to ~3 here, a step of 1.6e-2) times |hidden| (~0.5) can separate
    # the two, which bounds the absolute error of the few rows with a target.
    torch.testing.assert_close(weight_grad, weight_ref_grad, rtol=2e-2, atol=1.6e-2)


@pytest.mark.parametrize("sole_use,loss_grad", [(False, None), (True, None), (False, 1024.0), (True, 1.0),
                                                (True, 1024.0)])
def test_bf16_chunked_cross_entropy_with_loss_grad(sole_use, loss_grad):
    """linear_cross_entropy against bf16 logits + fp32 cross-entropy under a backward scaled by
    1024: told to the forward (loss_grad, the gradients finished there, a sole-use weight's in
    main_grad) or not."""
    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_cross_entropy

    init_distributed("cuda")
    group = build_grid(tp=1).tp_group
    tokens, dim, vocab, scale = 3000, 1024, 32000, loss_grad or 1024.0
    torch.manual_seed(3)
    hidden = (torch.randn(tokens, dim, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    weight = torch.nn.Parameter((torch.randn(vocab, dim, device="cuda") * 0.02).to(torch.bfloat16))
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    token_weights = torch.rand(tokens, device="cuda") / tokens
    logits = torch.mm(hidden.detach().float(), weight.detach().float().t()).requires_grad_()
    expected = (F.cross_entropy(logits, labels, reduction="none") * token_weights).sum()
    (expected * scale).backward()
    hidden_ref_grad = logits.grad @ weight.detach().float()
    weight_ref_grad = logits.grad.t() @ hidden.detach().float()
    if sole_use:
        weight.main_grad = torch.zeros(vocab, dim, device="cuda")
    total, _ = linear_cross_entropy(hidden, weight, labels, token_weights, group, 0, vocab, sole_use=sole_use,
                                    loss_grad=loss_grad)
    (total * scale).backward()
    torch.testing.assert_close(total, expected.detach(), rtol=2e-3, atol=2e-3)
    # Relative to the largest entry: the gradients scale with `scale` and the token weights.
    for got, want in ((hidden.grad.float(), hidden_ref_grad),
                      (weight.main_grad if sole_use else weight.grad.float(), weight_ref_grad)):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert weight.main_grad_filled if sole_use else weight.grad is not None


@pytest.mark.parametrize("loss_grad", [None, 1.0])
def test_bf16_chunked_cross_entropy_frozen_weight(loss_grad):
    """A frozen output layer (LoRA, QLoRA): the hidden state's gradient of the plain path in
    both chunked paths, and nothing written for the weight."""
    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_cross_entropy, linear_token_losses

    init_distributed("cuda")
    group = build_grid(tp=1).tp_group
    tokens, dim, vocab = 3000, 1024, 32000
    torch.manual_seed(4)
    hidden = (torch.randn(tokens, dim, device="cuda") * 0.5).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim, device="cuda") * 0.02).to(torch.bfloat16)  # frozen: no grad
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    token_weights = torch.rand(tokens, device="cuda") / tokens
    logits = torch.mm(hidden.float(), weight.float().t()).requires_grad_()
    expected = (F.cross_entropy(logits, labels, reduction="none") * token_weights).sum()
    expected.backward()
    hidden_ref_grad = logits.grad @ weight.float()
    for token_path in (False, True):
        h = hidden.clone().requires_grad_()
        if token_path:
            total = (linear_token_losses(h, weight, labels, group, 0, vocab, sole_use=True) * token_weights).sum()
        else:
            total, _ = linear_cross_entropy(h, weight, labels, token_weights, group, 0, vocab, sole_use=True,
                                            loss_grad=loss_grad)
        total.backward()
        torch.testing.assert_close(total, expected.detach(), rtol=2e-3, atol=2e-3)
        assert (h.grad.float() - hidden_ref_grad).abs().max() <= 2e-2 * hidden_ref_grad.abs().max()
    assert weight.grad is None and not hasattr(weight, "main_grad")
