"""Contiguous gradient and parameter buffers per model chunk, cut into buckets that are
reduced over data parallelism as soon as their gradients are complete.

Megatron-style: every parameter's `.data` becomes a view into one flat parameter buffer and
it gains a `main_grad`, a view into one flat fp32 gradient buffer of the same layout. A
post-accumulate hook adds each fresh `.grad` (bf16, fp16 or fp32) into `main_grad` and frees
it, so gradients accumulate across micro-batches in fp32 (the linears' GEMMs write theirs into
main_grad directly and flag it, parallel/main_grad_linear.py; the hook then only counts it). When the last micro-batch's gradient
of every parameter of a bucket has arrived, the hook launches that bucket's asynchronous
all-reduce (replicated optimizer) or reduce-scatter (sharded optimizer), overlapping the
communication with the rest of the backward pass. Buckets are padded to a multiple of the DP
size so each rank owns an equal, contiguous shard; the same layout carries the all-gather of
updated parameters.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel import comm
from parallel.main_grad_linear import take_filled_flag

# Each DP shard of a bucket is a multiple of this many elements (256 bytes of fp32), so
# shards start aligned for vectorised kernels and NCCL.
SHARD_ALIGN = 64
# Every parameter starts at a multiple of this many elements, so a parameter that follows an
# odd-sized one (a scalar head's bias) is still aligned for vectorised kernels.
PARAM_ALIGN = 64


@dataclasses.dataclass
class Bucket:
    index: int
    params: list
    start: int  # offset in the chunk's flat buffers
    numel: int  # padded: a multiple of dp x SHARD_ALIGN
    expected_grads: int  # hook calls per step (parameters x micro-batches)
    arrived: int = 0
    grad_handle: object = None
    grad_shard_out: torch.Tensor | None = None
    gather_handle: object = None
    launched: bool = False

    @property
    def deferred(self) -> bool:
        """Holds a parameter whose gradient another group must sum first (a tied embedding
        copy): its reduction starts from finish_grad_reduce, after the optimizer's pre-reduce
        hooks, never from backward."""
        return any(getattr(p, "defer_grad_reduce", False) for p in self.params)

    @property
    def end(self) -> int:
        return self.start + self.numel


class GradBuffer:
    """One model chunk's parameters and fp32 main grads in flat buffers, cut into buckets.

    shard: each DP rank owns 1/dp of every bucket (reduce-scatter in, all-gather out);
    otherwise every rank owns every bucket (all-reduce).
    microbatches: backward passes per step; a bucket is complete after that many grads of each
    of its parameters.
    """

    def __init__(self, named_params, dp_group, bucket_numel: int, shard: bool, overlap_grad_reduce: bool,
                 microbatches: int):
        self.names = {param: name for name, param in named_params}
        self.dp_group, self.dp = dp_group, comm.group_size(dp_group)
        self.dp_rank = dist.get_rank(dp_group) if self.dp > 1 else 0
        self.shard, self.overlap, self.microbatches = shard, overlap_grad_reduce, microbatches
        self.launched_in_backward = 0  # buckets whose reduction a backward hook started this step
        # Reverse registration order is roughly the order backward produces gradients, so the
        # first bucket is ready first.
        params = [p for _, p in named_params][::-1]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"a gradient buffer needs one parameter dtype per chunk, got {sorted(map(str, dtypes))}")
        self.buckets, self.offsets = self._layout(params, bucket_numel)
        total = self.buckets[-1].end if self.buckets else 0
        device = params[0].device if params else torch.device("cpu")
        self.grad_data = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_data = torch.zeros(total, dtype=params[0].dtype if params else torch.float32, device=device)
        for bucket in self.buckets:
            for param in bucket.params:
                self._adopt(param, bucket)

    # ---- layout ---------------------------------------------------------------------
    def _layout(self, params, bucket_numel):
        align = self.dp * SHARD_ALIGN
        buckets, offsets, members, start, size = [], {}, [], 0, 0
        for param in params:
            size = -(-size // PARAM_ALIGN) * PARAM_ALIGN
            offsets[param] = start + size
            members.append(param)
            size += param.numel()
            if size >= bucket_numel or param is params[-1]:
                padded = -(-size // align) * align
                buckets.append(Bucket(len(buckets), members, start, padded, len(members) * self.microbatches))
                members, start, size = [], start + padded, 0
        return buckets, offsets

    def _adopt(self, param, bucket) -> None:
        """Move the parameter into the flat buffer and give it a main_grad view."""
        offset, numel = self.offsets[param], param.numel()
        flat = self.param_data[offset:offset + numel]
        flat.copy_(param.data.reshape(-1))
        param.data = flat.view(param.shape)
        param.main_grad = self.grad_data[offset:offset + numel].view(param.shape)
        param.register_post_accumulate_grad_hook(self._accumulate_hook(bucket))

    def shard_range(self, bucket) -> tuple:
        """[start, end) of this rank's shard of `bucket` in the flat buffers."""
        if not self.shard:
            return bucket.start, bucket.end
        size = bucket.numel // self.dp
        return bucket.start + self.dp_rank * size, bucket.start + (self.dp_rank + 1) * size

    def param_range(self, param) -> tuple:
        offset = self.offsets[param]
        return offset, offset + param.numel()

    # ---- gradients ------------------------------------------------------------------
    def _accumulate_hook(self, bucket):
        def hook(param):
            if bucket.launched:
                raise RuntimeError(
                    f"a gradient of bucket {bucket.index} arrived after the bucket was reduced: this step ran more "
                    f"than the {self.microbatches} backward passes per step the optimizer was built for")
            if not take_filled_flag(param):  # else the GEMM already added it (parallel/main_grad_linear.py)
                param.main_grad.add_(param.grad)
            param.grad = None
            bucket.arrived += 1
            if self.overlap and bucket.arrived == bucket.expected_grads and not bucket.deferred:
                self.launch_grad_reduce(bucket)
                self.launched_in_backward += 1
        return hook

    def launch_grad_reduce(self, bucket) -> None:
        bucket.launched = True
        if self.dp == 1:
            return
        grads = self.grad_data[bucket.start:bucket.end]
        if self.shard:
            # A separate output, not an alias of the input: gloo does not promise in-place.
            bucket.grad_shard_out = torch.empty(bucket.numel // self.dp, dtype=grads.dtype, device=grads.device)
            bucket.grad_handle = comm.reduce_scatter_flat(bucket.grad_shard_out, grads, self.dp_group, async_op=True)
        else:
            bucket.grad_handle = comm.all_reduce(grads, self.dp_group, async_op=True)

    def finish_grad_reduce(self) -> None:
        """Start the buckets the hooks did not (overlap off, or unused parameters), in bucket
        order on every rank, then wait; afterwards this rank's shard of main_grad is summed."""
        for bucket in self.buckets:
            if not bucket.launched:
                self.launch_grad_reduce(bucket)
        for bucket in self.buckets:
            if bucket.grad_handle is not None:
                bucket.grad_handle.wait()
                bucket.grad_handle = None
            if bucket.grad_shard_out is not None:
                start, end = self.shard_range(bucket)
                self.grad_data[start:end].copy_(bucket.grad_shard_out)
                bucket.grad_shard_out = None

    def set_microbatches(self, count: int) -> None:
        """Backward passes per step from now on: a bucket is complete after `count` grads of each
        of its parameters."""
        self.microbatches = count
        for bucket in self.buckets:
            bucket.expected_grads = len(bucket.params) * count

    def zero_grad(self) -> None:
        self.grad_data.zero_()
        self.launched_in_backward = 0
        for bucket in self.buckets:
            bucket.arrived, bucket.launched = 0, False
            for param in bucket.params:
                param.grad = None

    # ---- parameters -----------------------------------------------------------------
    def launch_param_gather(self) -> None:
        """All-gather every bucket's updated shards into the parameter buffer (async)."""
        if not self.shard or self.dp == 1:
            return
        for bucket in self.buckets:
            start, end = self.shard_range(bucket)
            own = self.param_data[start:end].clone()  # the input must not alias the output
            bucket.gather_handle = comm.all_gather_flat(self.param_data[bucket.start:bucket.end], own,
                                                        self.dp_group, async_op=True)

    def wait_param_gather(self, buckets=None) -> None:
        for bucket in self.buckets if buckets is None else buckets:
            if bucket.gather_handle is not None:
                bucket.gather_handle.wait()
                bucket.gather_handle = None

    def bucket_of(self, param):
        offset = self.offsets[param]
        return next(b for b in self.buckets if b.start <= offset < b.end)
