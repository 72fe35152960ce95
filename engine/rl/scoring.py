"""Reading a model over rollout sequences: log-probabilities of the response tokens, a critic's
values, a reward model's scores; under TP (vocab-split logits), SP and PP.

Rollout sequences are [b, S]: a prompt left-padded to width P, then the response of n = S - P
tokens. The logits at position t predict token t + 1, so the response's log-probabilities and
values come from positions P - 1 .. S - 2. Only those positions reach the output layer.
"""
from __future__ import annotations

import torch

from engine.config import ConfigError
from engine.inference import (broadcast_from_last_stage, build_chunks, checkpoint_model_config, forward_through_stages,
                              freeze, load_model_weights, sequence_parallel_off)
from engine.checkpoint import resolve_step_dir, stored_shapes
from models.config import validate_model
from models.value_head import HEAD_NAME, attach_scalar_head, last_token_scores
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.linear_cross_entropy import linear_token_losses


def response_logprobs(model, normed, tokens, prompt_width: int, temperature: float = 1.0,
                      vocab_limit: int = 0) -> torch.Tensor:
    """log p(token) [b, n] of the response tokens from a last stage's normed hidden state
    (gradients flow; the vocab-split softmax is reduced over TP without gathering logits).
    vocab_limit > 0 takes the softmax over ids below it only: the distribution the generator
    samples from when the tokenizer is smaller than the model's vocabulary. With
    model.fused_cross_entropy (the default) no logits are kept: the output layer and the
    softmax run chunk by chunk, as for the pretraining loss."""
    hidden = model.vocab_parallel_input(normed)[prompt_width - 1:-1]
    targets = tokens[:, prompt_width:].t()
    weight, vocab = model.output_layer_weight(), vocab_limit or model.cfg.vocab_size
    if model.cfg.fused_cross_entropy:
        # Chunk by chunk, never the [n, b, v/tp] logits; logits / T as (hidden / T) W^T.
        n, b, h = hidden.shape
        scaled = hidden / temperature if temperature not in (0.0, 1.0) else hidden
        loss = linear_token_losses(scaled.reshape(n * b, h), weight, targets.reshape(-1), model.tp_group,
                                   model.vocab_start, vocab, sole_use=hasattr(model, "output_weight")).view(n, b)
        return -loss.t()
    logits = torch.nn.functional.linear(hidden, weight)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    loss = vocab_parallel_cross_entropy(logits, targets, model.tp_group, model.vocab_start, vocab)
    return -loss.t()


def response_values(model, normed, prompt_width: int) -> torch.Tensor:
    """The critic's value [b, n] of the state before each response token."""
    return model.scalar_head(normed)[:, prompt_width - 1:-1]


def forward_batch(chunks, grid, autocast, batch: dict, read_last):
    """One forward of `batch` (tokens, position_ids, document_ids) through every stage without
    gradients; `read_last(model, normed)` turns the last stage's normed hidden state into the
    result, returned there (None on other stages)."""
    tokens = batch["tokens"]

    def run_chunk(model, hidden):
        with autocast():
            out = model(tokens if model.pre_process else None, hidden=hidden, position_ids=batch["position_ids"],
                        document_ids=batch["document_ids"], return_hidden=model.post_process)
            return read_last(model, out) if model.post_process else out

    shape = (tokens.shape[1], tokens.shape[0], chunks[0].cfg.hidden_size)
    dtype = next(chunks[0].parameters()).dtype
    with torch.no_grad(), sequence_parallel_off(chunks):
        return forward_through_stages(chunks, grid, run_chunk, shape, dtype, tokens.device)


class RewardModelScorer:
    """A trained reward model (train.objective reward) on this grid, frozen: scores a sequence
    at its last real token."""

    def __init__(self, cfg, grid, rng, device, dtype, autocast):
        path = cfg.rl.reward_model
        model_cfg = checkpoint_model_config(path)
        if model_cfg.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"rl.reward_model: the reward model's vocabulary has {model_cfg.vocab_size} tokens but "
                              f"the policy's has {cfg.model.vocab_size}; both must use one tokenizer")
        if f"model.{HEAD_NAME}.weight" not in stored_shapes(resolve_step_dir(path, -1)):
            raise ConfigError(f"rl.reward_model: {path} has no {HEAD_NAME}; train one with train.objective reward")
        try:
            validate_model(model_cfg, grid.tp)
        except ValueError as error:
            raise ConfigError(f"rl.reward_model: {error}") from None
        self.chunks = build_chunks(model_cfg, grid, rng, device, dtype, cfg.train.seed)
        if self.chunks[-1].post_process:
            attach_scalar_head(self.chunks[-1], cfg.train.seed)
        load_model_weights(self.chunks, grid, path, model_cfg)
        freeze(self.chunks)
        self.grid, self.autocast = grid, autocast

    def score(self, batch: dict, last_index: torch.Tensor) -> torch.Tensor:
        scores = forward_batch(self.chunks, self.grid, self.autocast, batch,
                               lambda model, normed: last_token_scores(model.scalar_head(normed), last_index))
        out = torch.zeros(len(last_index), dtype=torch.float32, device=last_index.device)
        if scores is not None:
            out.copy_(scores)
        return broadcast_from_last_stage(out, self.grid)
