"""Point-to-point exchange of activations and their gradients between neighbouring stages.

One call posts every send and receive of a schedule step as one `batch_isend_irecv`, so on
NCCL they form one group (no ordering deadlock between a send to a peer and a receive from
it), and on gloo they are all in flight at once. Stages form a ring (the last rank's chunk c
feeds rank 0's chunk c+1 when stages are interleaved); a schedule simply never asks the first
stage to receive activations or the last to send them when there is nothing to exchange.

NCCL ignores tags: it matches the sends and receives between two ranks in the order they are
posted. With pp = 2 both neighbours are the same rank, and an interleaved step can carry an
activation and a gradient each way, so every exchange posts its activation messages before its
gradient messages, on both sides. No tags are used, so gloo matches in the same order and the
CPU tests check the order the GPUs rely on.
Every tensor has the one shape [seq (/tp under sequence parallelism), micro_batch, hidden], known
to both sides, so no shapes are exchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.grid import StagePosition
from parallel.pipeline.trace import COMM_TRACK, NullTracer


class PipelineCommunicator(StagePosition):
    def __init__(self, pp_group, pp_rank: int, shape: tuple, dtype: torch.dtype, device: torch.device,
                 tracer=None):
        ranks = dist.get_process_group_ranks(pp_group)
        self.group, self.pp_rank, self.pp = pp_group, pp_rank, len(ranks)
        self.prev_rank = ranks[(pp_rank - 1) % self.pp]
        self.next_rank = ranks[(pp_rank + 1) % self.pp]
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.tracer = tracer or NullTracer()
        # NCCL wants a group's first operation to be collective before any send/recv on it.
        dist.all_reduce(torch.zeros(1, device=device), group=pp_group)

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _op(self, fn, tensor, peer):
        return dist.P2POp(fn, tensor, peer, self.group)

    def exchange(self, send_next=None, send_prev=None, recv_prev: bool = False, recv_next: bool = False):
        """Send activations forward / gradients backward and receive either; returns
        (activation from the previous stage or None, gradient from the next stage or None)."""
        ops, from_prev, from_next = [], None, None
        # Activations first, then gradients: the posting order is how peers match (see above).
        if send_next is not None:
            ops.append(self._op(dist.isend, send_next.detach().contiguous(), self.next_rank))
        if recv_prev:
            from_prev = self._buffer()
            ops.append(self._op(dist.irecv, from_prev, self.prev_rank))
        if send_prev is not None:
            ops.append(self._op(dist.isend, send_prev.detach().contiguous(), self.prev_rank))
        if recv_next:
            from_next = self._buffer()
            ops.append(self._op(dist.irecv, from_next, self.next_rank))
        if not ops:
            return None, None
        with self.tracer.span(self._describe(send_next, send_prev, recv_prev, recv_next), COMM_TRACK):
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if from_prev is not None:
            from_prev.requires_grad_()  # the stage's backward needs the gradient of its input
        return from_prev, from_next

    @staticmethod
    def _describe(send_next, send_prev, recv_prev, recv_next) -> str:
        parts = [("send_fwd", send_next is not None), ("send_bwd", send_prev is not None),
                 ("recv_fwd", recv_prev), ("recv_bwd", recv_next)]
        return "+".join(name for name, active in parts if active)

    # ---- the named patterns of the schedules ----------------------------------------------
    def recv_forward(self):
        return self.exchange(recv_prev=True)[0]

    def send_forward(self, output) -> None:
        self.exchange(send_next=output)

    def recv_backward(self):
        return self.exchange(recv_next=True)[1]

    def send_backward(self, input_grad) -> None:
        self.exchange(send_prev=input_grad)
