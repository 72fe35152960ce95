"""CUDA graphs of a model chunk's transformer layers (`model.cuda_graphs true`).

Why: eager, a layer's forward and backward launch a few dozen kernels through Python and
autograd, about 5 ms of host time per layer and micro-batch. On one H100/H200 that is close
to the GPU's own time for llama-1.3b's layers, and under tensor parallelism (where each GPU's
share shrinks) the host sets the pace. Replaying a captured graph costs microseconds.

How: at the first training forward with gradients, every layer's forward and backward are
captured once into CUDA graphs that share one memory pool, in the order they run (forwards
0..n-1, then backwards n-1..0). Graphs sharing a pool are safe when replayed in capture
order, which is what one micro-batch's forward and backward do. Layer i+1's graph reads
layer i's static output, and layer i's backward reads layer i+1's static input gradient, so
nothing is copied between layers. Each layer then runs as an autograd Function whose forward
and backward replay its graphs.

Parameter gradients take the eager path's route: the linears' GEMMs accumulate weight
gradients into `main_grad` (parallel/main_grad_linear.py) inside the backward graph, and the
Function hands autograd the same flagged placeholders for them; the other gradients (norm
gains, biases, FP8 or compiled linears) come out of the graph in static tensors. The
gradient buffer's hooks then add and count them exactly as in eager, bucket reductions
included, and a graphed and an eager forward of the same layers can share one backward.

Packed documents (SFT, PPO and GRPO batches, left-padded rollouts): with SDPA the attention
mask is a function of the batch's `document_ids` alone, built with tensor ops, so it can live
inside the graphs. The ids are one more static input, copied in per micro-batch; the first
layer's graph builds the mask from them and the later layers' graphs read it (models/attention.py
hands one mask to every layer of a capture, as it does to every layer of an eager forward).
FlexAttention's block mask, flash-attn's and TE's varlen boundaries are built with host work, so
`documents` is only set for `model.attention_backend sdpa`.

Limits (checked in engine/config.py): CUDA, one pipeline stage (1F1B keeps several
micro-batches' activations alive, and a graph holds one), no dropout, no activation
recompute. Inputs of another shape, packed documents without `documents`, a KV cache, or a
second forward before the first one's backward run the eager layers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from parallel.main_grad_linear import filled_placeholder, take_filled_flag

WARMUP_ITERATIONS = 2  # eager runs before capture: compile kernels, build cuBLAS/cuDNN plans, NCCL comms
# Every LayerGraphs that captured graphs, so shutdown can free them first: NCCL cannot destroy a
# communicator while a graph that captured its collectives lives (destroy_process_group hangs).
_CAPTURED = weakref.WeakSet()


def release_all() -> None:
    """Free every captured layer graph (before the process group is destroyed)."""
    for holder in list(_CAPTURED):
        holder.release()


@dataclasses.dataclass
class _LayerGraph:
    layer: torch.nn.Module
    params: list  # trainable parameters, in the order the Function receives them
    static_in: torch.Tensor
    static_out: torch.Tensor
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph | None = None
    static_grad_out: torch.Tensor | None = None
    static_grad_in: torch.Tensor | None = None  # None when the stack's input needs no gradient
    fused: list = dataclasses.field(default_factory=list)  # per parameter: gradient written into main_grad by its GEMM
    static_param_grads: list = dataclasses.field(default_factory=list)  # the others' gradients (None: fused or unused)


class LayerGraphs:
    """The transformer layers of one model chunk, run as CUDA graphs where they can be."""

    def __init__(self, layers, documents: bool = False):
        self.layers = list(layers)
        self.documents = documents  # packed documents replay too (their mask is built in the graphs)
        self.static_documents = None
        self.graphs: list[_LayerGraph] | None = None
        self.signature = None
        self.static_rope: tuple = ()
        self._pending = None  # weakref to the anchor layer's autograd node of a forward whose backward has not run
        # The lowest layer a backward reaches: 0, or with a frozen input the first layer with
        # trainable parameters (None: no backward at all). Its backward ends a micro-batch's.
        self.anchor: int | None = None

    def applies(self, document_ids, kv_cache) -> bool:
        return (torch.is_grad_enabled() and (document_ids is None or self.documents) and kv_cache is None
                and all(layer.training for layer in self.layers))

    def __call__(self, hidden: torch.Tensor, rope, document_ids=None):
        """The layers' output, or None when this input must run eagerly (see the module notes)."""
        if not hidden.is_cuda:
            raise RuntimeError("model.cuda_graphs needs a CUDA device; set it false for CPU runs")
        rope = tuple(rope) if rope is not None else ()
        signature = _signature(hidden, rope, document_ids)
        if self.graphs is None:
            self._capture(hidden, rope, document_ids)
            self.signature = signature
        if signature != self.signature or self._backward_pending():
            return None
        for table, static in zip(rope, self.static_rope):
            static.copy_(table)
        if document_ids is not None:
            self.static_documents.copy_(document_ids)
        for graph in self.graphs:
            _run_forward_pre_hooks(graph.layer)
            hidden = _ReplayLayer.apply(graph, self, hidden, *graph.params)
        return hidden

    def release(self) -> None:
        """Free the graphs (at shutdown: a later training forward would capture them again,
        which clears the layers' main_grad)."""
        torch.cuda.synchronize()
        for graph in self.graphs or ():
            graph.forward_graph.reset()
            if graph.backward_graph is not None:
                graph.backward_graph.reset()
        self.graphs, self.signature, self._pending = None, None, None
        _CAPTURED.discard(self)

    def _backward_pending(self) -> bool:
        """A graphed forward whose backward has not run yet still owns the graphs' activations
        (unless its autograd graph was dropped, which frees the node the weakref points to)."""
        return self._pending is not None and self._pending() is not None

    # ---- capture ------------------------------------------------------------------------
    def _capture(self, hidden, rope, document_ids) -> None:
        params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        for layer_params in params:
            for param in layer_params:
                if getattr(param, "main_grad", None) is None:
                    raise RuntimeError("model.cuda_graphs needs every trainable parameter in a gradient buffer "
                                       "(main_grad), as the training engine sets up")
        self.static_rope = tuple(t.detach().clone() for t in rope)
        self.static_documents = document_ids.clone() if document_ids is not None else None
        needs_input_grad = hidden.requires_grad
        trained = [i for i, layer_params in enumerate(params) if layer_params]
        self.anchor = 0 if needs_input_grad else (trained[0] if trained else None)
        with capture_autocast():
            self._warm_up(hidden.detach(), needs_input_grad, [p for layer_params in params for p in layer_params])
            for layer_params in params:
                for param in layer_params:
                    param.main_grad.zero_()  # the warm-up's gradients; no real one exists before the first forward
                    param.main_grad_filled = False
            pool = torch.cuda.graph_pool_handle()
            self.graphs = self._capture_forwards(hidden, needs_input_grad, params, pool)
            _CAPTURED.add(self)
            self._capture_backwards(pool)

    def _static_args(self) -> tuple:
        """What every layer takes beside its input: rope tables and document ids (static copies)."""
        return (self.static_rope if self.static_rope else None, self.static_documents)

    def _warm_up(self, sample: torch.Tensor, needs_input_grad: bool, trainable: list) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERATIONS):
                x = sample.clone().requires_grad_(needs_input_grad)
                out = x
                for layer in self.layers:
                    out = layer(out, *self._static_args())
                inputs = ([x] if needs_input_grad else []) + trainable
                if inputs:
                    # A zero gradient: state the backward keeps (an FP8 amax history) sees nothing
                    # larger than the real gradients will bring.
                    torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)

    def _capture_forwards(self, hidden, needs_input_grad, params, pool) -> list:
        graphs = []
        static_in = torch.empty_like(hidden).requires_grad_(needs_input_grad)
        for layer, layer_params in zip(self.layers, params):
            forward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward_graph, pool=pool, capture_error_mode="thread_local"):
                static_out = layer(static_in, *self._static_args())
            graphs.append(_LayerGraph(layer, layer_params, static_in, static_out, forward_graph))
            # The next layer reads this output in place; its gradient stops at this alias.
            static_in = static_out.detach().requires_grad_(True)
        return graphs

    def _capture_backwards(self, pool) -> None:
        if self.anchor is None:
            return
        grad_out = torch.empty_like(self.graphs[-1].static_out)
        stack_input_grad = self.graphs[0].static_in.requires_grad
        anchor = self.graphs[self.anchor]
        for graph in reversed(self.graphs[self.anchor:]):  # below the anchor no backward runs
            # Every layer passes its input gradient down, except the anchor over a frozen input.
            with_input = graph is not anchor or stack_input_grad
            inputs = ([graph.static_in] if with_input else []) + graph.params
            backward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(backward_graph, pool=pool, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(graph.static_out, inputs, grad_out, allow_unused=True)
            param_grads = grads[1:] if with_input else grads
            graph.fused = [take_filled_flag(p) for p in graph.params]
            graph.static_param_grads = [None if fused else g for fused, g in zip(graph.fused, param_grads)]
            graph.backward_graph, graph.static_grad_out = backward_graph, grad_out
            graph.static_grad_in = grads[0] if with_input else None
            grad_out = graph.static_grad_in


class _ReplayLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _LayerGraph, owner: LayerGraphs, x, *params):
        ctx.graph, ctx.owner = graph, owner
        if owner.anchor is not None and graph is owner.graphs[owner.anchor]:
            owner._pending = weakref.ref(ctx)
        if x.data_ptr() != graph.static_in.data_ptr():
            graph.static_in.copy_(x)
        graph.forward_graph.replay()
        return graph.static_out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        graph = ctx.graph
        if grad_out.data_ptr() != graph.static_grad_out.data_ptr():
            graph.static_grad_out.copy_(grad_out)
        graph.backward_graph.replay()
        if graph is ctx.owner.graphs[ctx.owner.anchor]:
            ctx.owner._pending = None  # the last replay of this micro-batch: the graphs are free again
        grad_in = _detached(graph.static_grad_in)
        param_grads = (filled_placeholder(p) if fused else _detached(grad)
                       for p, fused, grad in zip(graph.params, graph.fused, graph.static_param_grads))
        return (None, None, grad_in, *param_grads)


def _detached(tensor):
    return tensor.detach() if tensor is not None else None


def _signature(hidden, rope, document_ids) -> tuple:
    documents = () if document_ids is None else (document_ids,)
    return (tuple((tuple(t.shape), t.dtype, t.device) for t in (hidden, *rope, *documents))
            + (hidden.requires_grad, document_ids is not None))


def _run_forward_pre_hooks(layer: torch.nn.Module) -> None:
    """A replay bypasses Module.__call__; the optimizer's hooks that wait for this layer's
    all-gathered weights (optim.overlap_param_gather) must still run before it."""
    for module in layer.modules():
        for hook in list(module._forward_pre_hooks.values()):
            hook(module, ())


def capture_autocast():
    """Autocast's cast cache would bake casts made outside the graph into it, or keep casts made
    during a capture that the graph still reads after the cache frees them: capture without it
    (autocast itself stays as it is). Also used by engine/decode_graph.py."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
