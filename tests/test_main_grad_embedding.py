"""The embedding adds its weight gradient into main_grad in its backward (fp32, at the looked-up
rows); a table tied to the output layer on the same stage keeps the plain path, and every
parameter's main_grad equals what autograd gives a copy of the model without a gradient buffer."""
import pytest
import torch
import torch.nn.functional as F

from parallel import main_grad_embedding
from parallel.grad_buffer import GradBuffer


def test_rows_are_summed_into_main_grad_in_fp32_and_the_bucket_counts_them(one_process_group):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(11, 8, dtype=torch.bfloat16))
    buffer = GradBuffer([("embedding", weight)], one_process_group, bucket_numel=10**6, shard=False,
                        overlap_grad_reduce=False, microbatches=2)
    expected = torch.zeros(11, 8, dtype=torch.float64)
    for _ in range(2):
        ids = torch.randint(0, 4, (5, 3))  # few ids, so each repeats within the micro-batch
        grad_out = torch.randn(5, 3, 8, dtype=torch.bfloat16)
        main_grad_embedding.embedding(ids, weight, sole_use=True).backward(grad_out)
        expected.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, 8).double())
    torch.testing.assert_close(weight.main_grad, expected.float(), rtol=1e-6, atol=1e-6)
    assert weight.grad is None and buffer.buckets[0].arrived == 2


def test_tokens_held_elsewhere_add_nothing():
    weight = torch.nn.Parameter(torch.randn(5, 4))
    weight.main_grad = torch.zeros(5, 4)
    ids = torch.tensor([[1, 3, 1, 0]])
    elsewhere = torch.tensor([[False, True, False, True]])
    main_grad_embedding.embedding(ids, weight, True, elsewhere).backward(torch.ones(1, 4, 4))
    expected = torch.zeros(5, 4)
    expected[1] = 2.0  # ids 3 and 0 belong to another vocabulary shard here
    torch.testing.assert_close(weight.main_grad, expected)


@pytest.mark.parametrize("sole_use, has_main_grad", [(False, True), (True, False)])
def test_shared_weight_or_no_buffer_is_plain_f_embedding(sole_use, has_main_grad):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    if has_main_grad:
        weight.main_grad = torch.zeros(6, 4)
    ids = torch.tensor([[0, 5, 0]])
    main_grad_embedding.embedding(ids, weight, sole_use).sum().backward()
    torch.testing.assert_close(weight.grad, F.one_hot(ids.reshape(-1), 6).sum(0).float()[:, None].expand(6, 4))
    if has_main_grad:
        assert not weight.main_grad.any()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])  # untied and tied embedding
def test_model_main_grads_equal_autograd_grads(one_process_group, preset):
    from models.config import ModelConfig, resolve_preset
    from models.gpt import GPTModel
    from parallel.random import RNGTracker

    cfg = resolve_preset(ModelConfig(preset=preset, seq_length=32))
    model, plain = (GPTModel(cfg, one_process_group, RNGTracker("cpu")) for _ in range(2))
    for m in (model, plain):
        m.init_weights(5)
    GradBuffer(list(model.named_parameters()), one_process_group, bucket_numel=10**8, shard=False,
               overlap_grad_reduce=False, microbatches=2)
    assert model.embedding.sole_use is not cfg.tie_embeddings
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=generator)
        labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=generator)
        model(tokens, labels=labels).sum().backward()
        plain(tokens, labels=labels).sum().backward()
    for (name, param), (_, reference) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(param.main_grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
