"""Unit checks of the TP pieces against plain torch, on real gloo processes."""
import torch
import torch.nn.functional as F

from parallel.sharding import ShardSpec
from tests.distributed import run_distributed


def test_shard_spec_slices_fused_blocks_per_rank():
    full = torch.arange(12.0).reshape(6, 2)  # blocks of 4 and 2 rows
    shards = [ShardSpec((6, 2), 0, (4, 2), rank, 2).slice(full) for rank in range(2)]
    assert shards[0][:, 0].tolist() == [0, 2, 8] and shards[1][:, 0].tolist() == [4, 6, 10]
    assert ShardSpec((6, 2), 0, (4, 2), 0, 2).local_shape() == (3, 2)


def _check_tp_ops():
    import torch.distributed as dist

    from parallel import comm
    from parallel.cross_entropy import vocab_parallel_cross_entropy
    from parallel.grid import build_grid, init_distributed
    from parallel.layers import ColumnParallelLinear, RowParallelLinear
    from parallel.mappings import gather_from_sp, scatter_to_sp
    from parallel.sharding import init_from_full

    init_distributed("cpu")
    grid = build_grid(tp=2)
    group, rank = grid.tp_group, grid.tp_rank
    torch.manual_seed(0)
    # Vocab-parallel cross-entropy (with padding rows past vocab_size) == torch's.
    logits = torch.randn(5, 3, 16, requires_grad=True)
    target = torch.randint(0, 13, (5, 3))
    expected = F.cross_entropy(logits[..., :13].reshape(-1, 13), target.reshape(-1), reduction="none").view(5, 3)
    expected.sum().backward()
    local = logits.detach()[..., rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, group, rank * 8, 13)
    loss.sum().backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(local.grad, logits.grad[..., rank * 8:(rank + 1) * 8])
    # Column then row parallel == the full MLP, with and without sequence parallelism.
    for sp in (False, True):
        column = ColumnParallelLinear(8, 12, group, bias=True, sequence_parallel=sp)
        row = RowParallelLinear(12, 8, group, bias=True, sequence_parallel=sp)
        for name, p in [(f"c.{n}", q) for n, q in column.named_parameters()] + [(f"r.{n}", q) for n, q in row.named_parameters()]:
            init_from_full(p, f"{name}{p.shard_spec.full_shape}", 0, 1.0)
        w1, b1 = column.weight.shard_spec.gather(column.weight.detach(), group), column.bias.shard_spec.gather(column.bias.detach(), group)
        w2, b2 = row.weight.shard_spec.gather(row.weight.detach(), group), row.bias.detach()
        x = torch.randn(4, 2, 8)
        expected = F.linear(F.linear(x, w1, b1), w2, b2)
        inp = scatter_to_sp(x, group) if sp else x
        out = row(column(inp))
        out = gather_from_sp(out, group, reduce_grad=False) if sp else out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    dist.barrier()
    return True


def test_tp_ops_match_torch():
    assert run_distributed(_check_tp_ops, 2) == [True, True]
