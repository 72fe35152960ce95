"""Pipeline schedules: no pipelining, 1F1B, and interleaved 1F1B (Megatron's orderings).

A schedule drives `forward_step(chunk, microbatch, input_tensor) -> output` (the next stage's
input, or the microbatch's scalar loss on the model's last stage) and the backward passes, and
moves tensors between stages through a `PipelineCommunicator`. It returns the losses computed
on this rank (empty except on the last stage) and `stats`, which counts how many microbatch
activations this rank held at once: the memory a schedule costs, counted, not timed.
"""
from __future__ import annotations

import collections
import dataclasses

import torch

from parallel.pipeline.trace import NullTracer


@dataclasses.dataclass
class ScheduleResult:
    losses: list
    stats: dict


class StageRunner:
    """Forward and backward of one (chunk, microbatch) on this rank, with bookkeeping."""

    def __init__(self, forward_step, is_loss_chunk, scale_loss, tracer, forward_only):
        self.forward_step, self.is_loss_chunk, self.scale_loss = forward_step, is_loss_chunk, scale_loss
        self.tracer, self.forward_only = tracer, forward_only
        self.losses, self.held, self.max_held = [], 0, 0

    def forward(self, chunk: int, microbatch: int, input_tensor):
        with self.tracer.span(f"F{microbatch}", chunk=chunk, microbatch=microbatch):
            output = self.forward_step(chunk, microbatch, input_tensor)
        if self.is_loss_chunk(chunk):
            self.losses.append(output.detach())
        if not self.forward_only:
            self.held += 1  # its activations stay alive until its backward
            self.max_held = max(self.max_held, self.held)
        return output

    def backward(self, chunk: int, microbatch: int, input_tensor, output, output_grad):
        """Backpropagate one microbatch; returns the gradient of its input (None on the first stage)."""
        with self.tracer.span(f"B{microbatch}", chunk=chunk, microbatch=microbatch):
            if output_grad is None:  # the loss itself
                torch.autograd.backward(self.scale_loss(output))
            else:
                torch.autograd.backward(output, grad_tensors=output_grad)
        self.held -= 1
        return None if input_tensor is None else input_tensor.grad

    def result(self) -> ScheduleResult:
        return ScheduleResult(self.losses, {"max_microbatches_in_flight": self.max_held})


# ---- the schedules --------------------------------------------------------------------------
def no_pipelining(runner: StageRunner, num_microbatches: int) -> None:
    """One stage: forward then backward per microbatch (plain gradient accumulation)."""
    for microbatch in range(num_microbatches):
        loss = runner.forward(0, microbatch, None)
        if not runner.forward_only:
            runner.backward(0, microbatch, None, loss, None)


def forward_only(runner: StageRunner, comm, num_microbatches: int, num_chunks: int) -> None:
    """Evaluation: each microbatch flows through every stage (and virtual chunk) in model order."""
    for microbatch in range(num_microbatches):
        for chunk in range(num_chunks):
            first = comm.is_first_stage and chunk == 0
            last = comm.is_last_stage and chunk == num_chunks - 1
            output = runner.forward(chunk, microbatch, None if first else comm.recv_forward())
            if not last:
                comm.send_forward(output)


def one_f_one_b(runner: StageRunner, comm, num_microbatches: int) -> None:
    """Warm-up forwards, then alternate one forward and one backward, then drain the backwards.
    Rank r holds at most pp - r microbatches (the warm-up ones plus the one in flight)."""
    first, last = comm.is_first_stage, comm.is_last_stage
    warmup = min(comm.pp - comm.pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    pending = collections.deque()  # (microbatch, input, output) awaiting backward, oldest first

    def receive_input():
        return None if first else comm.recv_forward()

    for microbatch in range(warmup):
        input_tensor = receive_input()
        output = runner.forward(0, microbatch, input_tensor)
        comm.send_forward(output)  # warm-up never runs on the last stage
        pending.append((microbatch, input_tensor, output))

    input_tensor = receive_input() if steady else None
    for step in range(steady):
        microbatch = warmup + step
        output = runner.forward(0, microbatch, input_tensor)
        output_grad = None if last else comm.exchange(send_next=output, recv_next=True)[1]
        pending.append((microbatch, input_tensor, output))
        input_grad = runner.backward(0, *pending.popleft(), output_grad)
        if first:
            input_tensor = None
        elif step == steady - 1:
            comm.send_backward(input_grad)
        else:
            input_tensor = comm.exchange(send_prev=input_grad, recv_prev=True)[0]

    while pending:
        output_grad = None if last else comm.recv_backward()
        input_grad = runner.backward(0, *pending.popleft(), output_grad)
        if not first:
            comm.send_backward(input_grad)


class InterleavedOrder:
    """Which chunk and microbatch the k-th forward / backward of a rank works on. Microbatches
    go in groups of pp through chunk 0, then the same group through chunk 1, and so on."""

    def __init__(self, pp: int, num_chunks: int):
        self.pp, self.num_chunks = pp, num_chunks

    def chunk(self, k: int, forward: bool) -> int:
        chunk = (k % (self.pp * self.num_chunks)) // self.pp
        return chunk if forward else self.num_chunks - 1 - chunk

    def microbatch(self, k: int) -> int:
        return (k // (self.pp * self.num_chunks)) * self.pp + k % self.pp


def interleaved_one_f_one_b(runner: StageRunner, comm, num_microbatches: int, num_chunks: int) -> None:
    """1F1B over virtual stages (rank r's chunk c is model stage c * pp + r), following
    Megatron-LM's forward_backward_pipelining_with_interleaving. Needs num_microbatches % pp == 0."""
    pp, rank = comm.pp, comm.pp_rank
    order = InterleavedOrder(pp, num_chunks)
    total = num_microbatches * num_chunks
    warmup = min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, total)
    steady = total - warmup
    inputs, outputs, output_grads = ([[] for _ in range(num_chunks)] for _ in range(3))

    def is_first_virtual(chunk):
        return rank == 0 and chunk == 0

    def is_last_virtual(chunk):
        return rank == pp - 1 and chunk == num_chunks - 1

    def forward_k(k):
        chunk = order.chunk(k, forward=True)
        if is_first_virtual(chunk) and len(inputs[chunk]) == len(outputs[chunk]):
            inputs[chunk].append(None)
        output = runner.forward(chunk, order.microbatch(k), inputs[chunk][-1])
        outputs[chunk].append(output)
        return None if is_last_virtual(chunk) else output  # the loss is not sent on

    def backward_k(k):
        chunk = order.chunk(k, forward=False)
        if is_last_virtual(chunk) and not output_grads[chunk]:
            output_grads[chunk].append(None)
        input_grad = runner.backward(chunk, order.microbatch(k), inputs[chunk].pop(0), outputs[chunk].pop(0),
                                     output_grads[chunk].pop(0))
        return None if is_first_virtual(chunk) else input_grad

    inputs[0].append(None if rank == 0 else comm.recv_forward())
    for k in range(warmup):
        output = forward_k(k)
        next_chunk = order.chunk(k + 1, forward=True)
        recv_prev = not (rank == 0 and next_chunk == 0) and k != total - 1
        if k == warmup - 1 and steady > 0:  # the first backward's gradient comes with the last warm-up send
            recv_next = rank != pp - 1
            input_tensor, output_grad = comm.exchange(send_next=output, recv_prev=recv_prev, recv_next=recv_next)
            output_grads[num_chunks - 1].append(output_grad)
        else:
            input_tensor, _ = comm.exchange(send_next=output, recv_prev=recv_prev)
        inputs[next_chunk].append(input_tensor)

    for k in range(steady):
        forward_index = k + warmup
        output = forward_k(forward_index)
        input_grad = backward_k(k)
        recv_prev, next_forward_chunk = _next_forward(order, rank, forward_index)
        recv_next, next_backward_chunk = _next_backward(order, rank, pp, num_chunks, k)
        recv_prev = recv_prev and k != steady - 1
        input_tensor, output_grad = comm.exchange(send_next=output, send_prev=input_grad,
                                                  recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_forward_chunk].append(input_tensor)
        if recv_next:
            output_grads[next_backward_chunk].append(output_grad)

    if steady == 0:
        output_grads[num_chunks - 1].append(None if rank == pp - 1 else comm.recv_backward())
    for k in range(steady, total):
        input_grad = backward_k(k)
        next_chunk = order.chunk(k + 1, forward=False)
        recv_next = not (rank == pp - 1 and next_chunk == num_chunks - 1) and k != total - 1
        output_grads[next_chunk].append(comm.exchange(send_prev=input_grad, recv_next=recv_next)[1])


def _next_forward(order: InterleavedOrder, rank: int, forward_index: int):
    """(receive an activation?, for which chunk) after the steady step's forward. Rank 0 takes
    its input from the last rank, which is pp - 1 forwards behind it."""
    if rank != 0:
        return True, order.chunk(forward_index + 1, forward=True)
    chunk = order.chunk(forward_index - (order.pp - 1), forward=True)
    return chunk != order.num_chunks - 1, chunk + 1


def _next_backward(order: InterleavedOrder, rank: int, pp: int, num_chunks: int, backward_index: int):
    """(receive a gradient?, for which chunk) after the steady step's backward; mirror of the above."""
    if rank != pp - 1:
        return True, order.chunk(backward_index + 1, forward=False)
    chunk = order.chunk(backward_index - (pp - 1), forward=False)
    return chunk != 0, chunk - 1


# ---- entry point ------------------------------------------------------------------------------
def run_schedule(forward_step, num_microbatches: int, num_chunks: int = 1, comm=None, scale_loss=None,
                 forward_only_pass: bool = False, tracer=None) -> ScheduleResult:
    """Run one step's microbatches: no pipelining without a communicator, 1F1B with one chunk per
    rank, interleaved 1F1B with several; `forward_only_pass` for evaluation (under no_grad)."""
    last_rank = comm is None or comm.is_last_stage
    runner = StageRunner(forward_step, lambda chunk: last_rank and chunk == num_chunks - 1,
                         scale_loss or (lambda loss: loss), tracer or NullTracer(), forward_only_pass)
    if comm is None or comm.pp == 1:
        if num_chunks != 1:
            raise ValueError("virtual pipeline chunks need more than one pipeline stage")
        no_pipelining(runner, num_microbatches)
    elif forward_only_pass:
        forward_only(runner, comm, num_microbatches, num_chunks)
    elif num_chunks == 1:
        one_f_one_b(runner, comm, num_microbatches)
    else:
        if num_microbatches % comm.pp:
            raise ValueError(f"the interleaved schedule needs the number of microbatches ({num_microbatches}) "
                             f"to be a multiple of the pipeline size ({comm.pp})")
        interleaved_one_f_one_b(runner, comm, num_microbatches, num_chunks)
    return runner.result()
