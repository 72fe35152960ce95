"""The GPT model (GPT-2 and Llama styles), whole or as one pipeline stage.

A stage holds the layers with the given global indices; the first stage also holds the
embeddings, the last the final norm, the output layer and the loss. Layers are registered
under their global index, so parameter names (and checkpoint keys) do not depend on the
pipeline layout.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from models.config import ModelConfig
from models.layer_graphs import LayerGraphs
from models.norms import Norm
from models.rope import rope_cache
from models.transformer import TransformerLayer
from parallel import comm
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.linear_cross_entropy import linear_cross_entropy, linear_token_losses
from parallel.layers import VocabParallelEmbedding
from parallel.mappings import copy_to_tp, gather_from_sp, scatter_to_sp
from parallel.random import RNGTracker
from parallel.sharding import ShardSpec, attach, init_from_full

OUTPUT_PROJECTIONS = ("attn.proj.weight", "mlp.fc2.weight")


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, rng: RNGTracker, layer_ids=None, pre_process=True,
                 post_process=True, sequence_parallel=False, device=None, dtype=None):
        super().__init__()
        self.cfg, self.tp_group, self.rng = cfg, tp_group, rng
        self.tp = comm.group_size(tp_group)
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.padded_vocab = cfg.padded_vocab_size(self.tp)
        self.layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        factory = dict(device=device, dtype=dtype)
        if pre_process:
            # Tied on a stage that also has the output layer, the table gets two gradients.
            self.embedding = VocabParallelEmbedding(self.padded_vocab, cfg.hidden_size, tp_group,
                                                    sequence_parallel=self.sequence_parallel,
                                                    sole_use=not (cfg.tie_embeddings and post_process), **factory)
            if cfg.position_embedding == "learned":
                shape = (cfg.max_position_embeddings, cfg.hidden_size)
                self.position_embedding = attach(nn.Parameter(torch.empty(shape, **factory)), ShardSpec(shape))
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, tp_group, self.sequence_parallel, rng, **factory) for i in self.layer_ids
        })
        if post_process:
            self.final_norm = Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, self.sequence_parallel, **factory)
            if not (cfg.tie_embeddings and pre_process):
                # Untied output layer, or the last stage's copy of a tied embedding (kept in
                # sync with the first stage by the pipeline's embedding-gradient all-reduce).
                spec = ShardSpec((self.padded_vocab, cfg.hidden_size), 0, (), self.embedding_rank(), self.tp)
                self.output_weight = attach(nn.Parameter(torch.empty(spec.local_shape(), **factory)), spec)
        self.recompute = cfg.recompute == "full"
        if cfg.compile:
            for layer in self.layers.values():
                layer.compile()  # in place: parameter names stay layout- and compile-independent
        self.layer_graphs = (LayerGraphs(self.layers.values(), documents=cfg.attention_backend == "sdpa")
                             if cfg.cuda_graphs and self.layer_ids else None)

    def embedding_rank(self) -> int:
        return torch.distributed.get_rank(self.tp_group) if self.tp > 1 else 0

    # ---- initialisation -------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from its full tensor so all layouts start equal."""
        scaled_std = self.cfg.init_std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(param)
            elif "norm" in name:
                nn.init.ones_(param)
            else:
                std = scaled_std if name.endswith(OUTPUT_PROJECTIONS) else self.cfg.init_std
                init_from_full(param, self.init_key(name), seed, std)

    def init_key(self, name: str) -> str:
        """A tied output layer draws the same values as the embedding it mirrors."""
        if name == "output_weight" and self.cfg.tie_embeddings:
            return "embedding.weight"
        return name

    # ---- forward ----------------------------------------------------------------------
    def forward(self, tokens=None, hidden=None, labels=None, position_ids=None, document_ids=None,
                loss_weights=None, kv_cache=None, return_hidden=False, loss_grad=None):
        # document_ids [b, s]: packed sequences; attention never crosses a document boundary.
        """tokens/labels/loss_weights: [b, s]. On the last stage: with labels, the per-token loss
        [b, s], or with loss_weights as well the scalar sum of weight x token loss (both through
        chunked paths that keep no logits, with model.fused_cross_entropy); without labels,
        local logits [s, b, v/tp]; with return_hidden, the final-normed hidden state (see `output_logits`, models/value_head.py).
        Other stages return the hidden state for the next stage. kv_cache: a
        models.kv_cache.KVCache that this forward appends to (generation). loss_grad: the
        gradient the caller's backward gives the scalar loss, when known (the loss scale): the
        chunked output layer then finishes its gradients in the forward."""
        if self.pre_process:
            hidden = self.embed(tokens, position_ids)
        seq_len = hidden.shape[0] * (self.tp if self.sequence_parallel else 1)
        rope = None
        if self.cfg.position_embedding == "rope":
            rope = rope_cache(seq_len, self.cfg.head_dim(), self.cfg.rope_theta, hidden.device, position_ids)
        hidden = self._run_layers(hidden, rope, document_ids, kv_cache)
        if not self.post_process:
            return hidden
        if return_hidden:
            return self.final_norm(hidden)
        return self.head(hidden, labels, loss_weights, loss_grad)

    def embed(self, tokens, position_ids=None):
        hidden = self.embedding(tokens.t())
        if self.cfg.position_embedding == "learned":
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            positions = self.position_embedding[position_ids.t()].expand(-1, tokens.shape[0], -1)
            hidden = hidden + (scatter_to_sp(positions, self.tp_group) if self.sequence_parallel else positions)
        if self.training and self.cfg.dropout > 0:
            ctx = self.rng.fork() if self.sequence_parallel else contextlib.nullcontext()
            with ctx:
                hidden = nn.functional.dropout(hidden, self.cfg.dropout)
        return hidden

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's slice of the output layer."""
        return self.embedding_rank() * (self.padded_vocab // self.tp)

    def vocab_parallel_input(self, normed):
        """The final-normed hidden state whole on every TP rank, for the vocab-split output layer
        (its gradient is summed over TP, since each rank's slice of the vocabulary contributes)."""
        if self.sequence_parallel:
            return gather_from_sp(normed, self.tp_group)
        return copy_to_tp(normed, self.tp_group)

    def output_layer_weight(self):
        return self.output_weight if hasattr(self, "output_weight") else self.embedding.weight

    def output_logits(self, normed):
        """Local logits [s, b, v/tp] from `forward(..., return_hidden=True)`'s output."""
        return nn.functional.linear(self.vocab_parallel_input(normed), self.output_layer_weight())

    def head(self, hidden, labels=None, loss_weights=None, loss_grad=None):
        hidden = self.vocab_parallel_input(self.final_norm(hidden))
        weight, vocab_start = self.output_layer_weight(), self.vocab_start
        if labels is not None and loss_weights is not None and self.cfg.fused_cross_entropy and torch.is_grad_enabled():
            s, b, h = hidden.shape
            total, _ = linear_cross_entropy(hidden.reshape(s * b, h), weight, labels.t().reshape(-1),
                                            loss_weights.t().reshape(-1), self.tp_group, vocab_start,
                                            self.cfg.vocab_size, sole_use=hasattr(self, "output_weight"),
                                            loss_grad=loss_grad)
            return total
        if labels is not None and loss_weights is None and self.cfg.fused_cross_entropy:
            s, b, h = hidden.shape  # per-token losses for sequence scores: no logits kept for backward
            token_loss = linear_token_losses(hidden.reshape(s * b, h), weight, labels.t().reshape(-1), self.tp_group,
                                             vocab_start, self.cfg.vocab_size, sole_use=hasattr(self, "output_weight"))
            return token_loss.view(s, b).t()
        logits = nn.functional.linear(hidden, weight)
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group, vocab_start, self.cfg.vocab_size).t()
        return loss if loss_weights is None else (loss.float() * loss_weights).sum()

    def _run_layers(self, hidden, rope, document_ids, kv_cache):
        graphs = self.layer_graphs
        if graphs is not None and self.training and graphs.applies(document_ids, kv_cache):
            graphed = graphs(hidden, rope, document_ids)
            if graphed is not None:
                return graphed
        for layer_id, layer in self.layers.items():
            cache = kv_cache.layer(int(layer_id)) if kv_cache is not None else None
            hidden = self._run_layer(layer, hidden, rope, document_ids, cache)
        return hidden

    def _run_layer(self, layer, hidden, rope, document_ids, kv_cache=None):
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return layer(hidden, rope, document_ids, kv_cache)
        return activation_checkpoint.checkpoint(layer, hidden, rope, document_ids, use_reentrant=False,
                                                context_fn=self._recompute_rng_contexts)

    def _recompute_rng_contexts(self):
        """Replay the TP-distinct RNG stream during recompute, as the default stream is."""
        saved = self.rng.tp_state

        @contextlib.contextmanager
        def replay():
            current = self.rng.tp_state
            self.rng.tp_state = saved
            try:
                yield
            finally:
                self.rng.tp_state = current

        return contextlib.nullcontext(), replay()
