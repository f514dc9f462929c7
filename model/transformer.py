"""The Mistral / Mixtral decoder over packed documents, in one file.

Module names are exactly those of Mistral's native checkpoints (`layers.0.attention.wq.weight`, ...), so a
`consolidated.safetensors` loads without renaming. Input is packed: a 1-D tensor of N tokens made of documents of
lengths `seqlens`; documents never attend to each other and positions restart at 0 in each.

There are no buffers: the rotary table is computed per forward from the positions, in fp32. So a model built on
the meta device needs nothing but its weights after `to_empty`, and `model.to(torch.bfloat16)` cannot round the
rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.attention import DocumentMask, resolve_backend, to_device
from model.settings import BACKENDS


def document_positions(seqlens: list[int], device: torch.device | str) -> torch.Tensor:
    """Position of every packed token inside its own document: [0..L0-1, 0..L1-1, ...].

    Made on the CPU, where the lengths are, and copied without waiting: on a GPU, a repeat_interleave would wait for
    the device.
    """
    lengths = torch.tensor(seqlens)
    starts = lengths.cumsum(0) - lengths
    return to_device(torch.arange(sum(seqlens)) - starts.repeat_interleave(lengths), device)


def rotary_table(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """cos + i·sin of every (position, frequency), complex64, shaped [N, 1, head_dim // 2] to broadcast over heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)[:, None]


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by its position (`rope`, from `rotary_table`); fp32 inside, x's dtype out.

    Mistral's native layout rotates interleaved pairs (x0, x1), (x2, x3), ... as complex numbers; Hugging Face's
    "rotate half" layout needs permuted wq/wk rows (see model/hf_format.py). One complex multiply (a kernel, forward
    and backward) rather than the four real products, two sums and a stack it stands for.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation of the last dimension, then a learned scale per feature."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares overflows or loses precision in bf16: normalise in fp32 (PyTorch's fused kernel, the
        # same numbers as the five operations it replaces), then scale in x's dtype.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions; who attends to whom is the mask's business."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
        """Attend the packed tokens x [N, dim]; returns [N, dim].

        Args:
            rope: the tokens' `rotary_table`.
            mask: anything with `attend(q, k, v)`: a `DocumentMask`, or a KV cache's layer (model/generate.py).
        """
        n = x.shape[0]
        q = apply_rotary(self.wq(x).view(n, self.n_heads, self.head_dim), rope)
        k = apply_rotary(self.wk(x).view(n, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(n, self.n_kv_heads, self.head_dim)
        return self.wo(mask.attend(q, k, v).reshape(n, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeFeedForward(nn.Module):
    """Mixtral's sparse layer: each token goes to its top-k experts, weighted by a softmax over those k logits.

    Dispatch sorts the (token, expert) pairs by expert so each expert runs once on a contiguous group of its
    tokens. Every expert is called, even with no token, so all ranks run the same modules (FSDP needs that).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, chosen = torch.topk(self.gate(x), self.top_k, dim=-1)
        weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
        expert_of_pair = chosen.flatten()
        order = expert_of_pair.argsort(stable=True)
        token_of_pair = order // self.top_k
        counts = torch.bincount(expert_of_pair, minlength=len(self.experts)).tolist()
        groups = x[token_of_pair].split(counts)
        y = torch.cat([expert(group) for expert, group in zip(self.experts, groups)])
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add(0, token_of_pair, y)


class TransformerBlock(nn.Module):
    """One pre-norm residual block: attention, then the feed-forward (or Mixtral's experts).

    Its forward takes only (hidden, rope table, mask) so it can be wrapped alone by FSDP2 `fully_shard` and
    activation checkpointing. `mask` is anything with `attend(q, k, v)`: a `DocumentMask` for packed documents, or a
    layer of a KV cache when decoding (model/generate.py).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeFeedForward(args) if args.moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Embeddings, blocks, final RMSNorm and an untied output head.

    Args:
        attention_backend: "auto" or one of BACKENDS; resolved at each forward against the input's device and
            dtype ("auto" picks the fastest there), so the same module works when built on the meta device and
            moved later.

    Raises:
        ValueError: an unknown attention backend.
    """

    def __init__(self, args: ModelArgs, attention_backend: str = "auto"):
        super().__init__()
        if attention_backend != "auto" and attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; expected 'auto' or one of {BACKENDS}")
        self.args = args
        self.attention_backend = attention_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def hidden_states(self, tokens: torch.Tensor, seqlens: list[int], cache=None) -> torch.Tensor:
        """Final-normed hidden states [N, dim], before the output head (training computes its loss in chunks).

        Under FSDP2 a method other than `forward` needs `register_fsdp_forward_method(model, "hidden_states")`.

        Args:
            tokens: the 1-D packed tokens, N of them.
            seqlens: the lengths of the packed documents; with a cache, `seqlens[b]` new tokens continue cached
                sequence b.
            cache: a `KVCache` (model/generate.py), for decoding.

        Raises:
            ValueError: `tokens` is not 1-D, or its length is not `sum(seqlens)`; the attention backend is not
                available on the tokens' device.
        """
        if tokens.ndim != 1 or sum(seqlens) != tokens.shape[0]:
            raise ValueError(f"tokens must be 1-D with sum(seqlens) = {sum(seqlens)} items, got {tuple(tokens.shape)}")
        h = self.tok_embeddings(tokens)
        if cache is None:
            positions = document_positions(seqlens, tokens.device)
            backend = resolve_backend(self.attention_backend, tokens.device, h.dtype)
            masks = [DocumentMask(seqlens, backend, self.args.sliding_window, tokens.device)] * len(self.layers)
        else:
            positions, masks = cache.prepare(seqlens)
        rope = rotary_table(positions, self.args.head_dim, self.args.rope_theta)
        for layer, mask in zip(self.layers, masks):
            h = layer(h, rope, mask)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, seqlens: list[int], cache=None) -> torch.Tensor:
        """Logits [N, vocab_size] in the model's dtype; arguments and errors as `hidden_states`'."""
        return self.output(self.hidden_states(tokens, seqlens, cache))
