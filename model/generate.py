"""Batched generation with a KV cache, for chat, evaluation samples and tests.

The cache holds every layer's keys and values for B sequences of up to `max_seqlen` tokens. A forward with a
cache takes `seqlens[b]` new tokens for each sequence b (a whole prompt at prefill, then one token per step),
at positions that continue where the sequence stopped. Cached attention always uses `sdpa` with an explicit
mask: decoding is one query per sequence, where the choice of kernel matters little. The sliding window is
applied by that mask rather than by a rotating buffer, so memory grows with the length of the conversation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.args import ModelArgs
from model.attention import document_ids
from model.transformer import Transformer, document_positions


class KVCache:
    """Every layer's keys and values for `batch_size` sequences of up to `max_seqlen` tokens each."""

    def __init__(self, args: ModelArgs, batch_size: int, max_seqlen: int, device, dtype: torch.dtype):
        shape = (args.n_layers, batch_size, max_seqlen, args.n_kv_heads, args.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * batch_size
        self.sliding_window = args.sliding_window

    def prepare(self, seqlens: list[int]) -> tuple[torch.Tensor, list[CachedAttention]]:
        """Reserve room for the new tokens of each sequence.

        Args:
            seqlens: how many new tokens each of the cache's sequences gets in this forward.

        Returns:
            The new tokens' positions, and one `CachedAttention` per layer.

        Raises:
            ValueError: a sequence gets no new token, or the cache has no room left for them.
        """
        batch, capacity = self.keys.shape[1], self.keys.shape[2]
        if len(seqlens) != batch or min(seqlens) <= 0:
            raise ValueError(f"a cached forward needs new tokens for each of the {batch} sequences, got {seqlens}")
        new_lengths = [n + s for n, s in zip(self.lengths, seqlens)]
        if max(new_lengths) > capacity:
            raise ValueError(f"KV cache full: {max(new_lengths)} tokens for a capacity of {capacity}")
        step = _Step(seqlens, self.lengths, self.sliding_window, self.keys.device)
        self.lengths = new_lengths
        layers = [CachedAttention(k, v, step) for k, v in zip(self.keys, self.values)]
        return step.positions, layers


class _Step:
    """Index tensors of one cached forward, shared by all layers: new token t belongs to sequence
    `sequence[t]`, is its `offset[t]`-th new token and sits at position `positions[t]`."""

    def __init__(self, seqlens: list[int], lengths: list[int], sliding_window: int | None, device):
        counts, start = torch.tensor(seqlens, device=device), torch.tensor(lengths, device=device)
        self.sequence = document_ids(seqlens, device)
        self.offset = document_positions(seqlens, device)
        self.positions = start[self.sequence] + self.offset
        self.n_queries, self.n_keys = max(seqlens), max(n + s for n, s in zip(lengths, seqlens))
        # Queries padded to [B, S]: a padding row repeats its sequence's last position, so no row is empty.
        query_offset = torch.minimum(torch.arange(self.n_queries, device=device)[None], counts[:, None] - 1)
        query_pos = start[:, None] + query_offset
        key_pos = torch.arange(self.n_keys, device=device)
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]
        if sliding_window:
            allowed &= query_pos[:, :, None] - key_pos[None, None, :] < sliding_window
        self.mask = allowed[:, None]  # [B, 1, S, T]


class CachedAttention:
    """One layer's view of the cache, with the same `attend(q, k, v)` as `DocumentMask`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, step: _Step):
        self.keys, self.values, self.step = keys, values, step

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values, then attend the new queries to their sequences' cached tokens.

        Args:
            q: [new tokens, n_heads, head_dim].
            k, v: [new tokens, n_kv_heads, head_dim].

        Returns:
            [new tokens, n_heads, head_dim].
        """
        s = self.step
        self.keys[s.sequence, s.positions] = k
        self.values[s.sequence, s.positions] = v
        # Pad the new queries to [B, S, heads, head_dim]; padding rows are computed, then dropped.
        padded = q.new_zeros(self.keys.shape[0], s.n_queries, *q.shape[1:])
        padded[s.sequence, s.offset] = q
        keys, values = (t[:, : s.n_keys].transpose(1, 2) for t in (self.keys, self.values))
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2), keys, values, attn_mask=s.mask, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2)[s.sequence, s.offset]


@torch.no_grad()  # not inference_mode: a model in training generates at its evals, then trains on
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    forward: Callable | None = None,
    every_step: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to `max_tokens` tokens; a sequence stops at EOS, which is not returned.

    Runs in eval mode (no LoRA dropout) and restores the model's mode afterwards.

    Args:
        prompts: token ids of each prompt; all are continued together, one batch.
        temperature: 0 for greedy decoding, else the temperature of nucleus sampling.
        top_p: the probability mass nucleus sampling keeps.
        seed: makes sampling reproducible.
        forward: runs the model (default: `model` itself; a model sharded by FSDP is run through its root).
        every_step: make all `max_tokens` steps even once every sequence has ended: the ranks of a sharded model
            must all make the same forward calls.

    Returns:
        The new tokens of each prompt, without EOS.

    Raises:
        ValueError: no prompt, or an empty one.
    """
    forward = forward or model
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    device = model.tok_embeddings.weight.device
    capacity = max(len(p) for p in prompts) + max_tokens
    cache = KVCache(model.args, len(prompts), capacity, device, model.tok_embeddings.weight.dtype)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    seqlens = [len(p) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        logits = forward(torch.tensor([t for p in prompts for t in p], device=device), seqlens, cache=cache)
        last = logits[torch.tensor(seqlens, device=device).cumsum(0) - 1]
        outputs, done = [[] for _ in prompts], [False] * len(prompts)
        for step in range(max_tokens):
            next_tokens = _sample(last, temperature, top_p, generator)
            for b, token in enumerate(next_tokens.tolist()):
                done[b] = done[b] or token == eos_id
                if not done[b]:
                    outputs[b].append(token)
            if (all(done) and not every_step) or step == max_tokens - 1:
                break
            last = forward(next_tokens, [1] * len(prompts), cache=cache)
    finally:
        model.train(was_training)
    return outputs


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:  # keep the fewest most likely tokens whose mass reaches top_p; the first always stays
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
