"""Causal attention over packed documents, with interchangeable backends.

A packed batch is N tokens made of documents of lengths `seqlens`. A token attends to earlier tokens of its own
document only, and with a sliding window W to the last W of them (itself included), as in Mistral's models.

Backends (all compute the same thing; `sdpa` is the reference the others are tested against):
- `sdpa`: `scaled_dot_product_attention` once per document, causal (`is_causal`; with a sliding window shorter
  than the document, that document's own L x L band mask). Runs everywhere, GQA without copying K/V
  (`enable_gqa`); it is the CPU default. One call per document rather than one over an N x N block-diagonal mask:
  the mask cost O(N^2) memory, and the scores between documents and of future tokens were all computed, then
  masked; a causal kernel skips the future, and nothing is computed between documents. A compiled block still
  takes the mask (see `DocumentMask.attend`).
- `varlen`: flash attention over `cu_seqlens` (`torch.nn.attention.varlen`), CUDA with fp16/bf16 only. PyTorch
  2.11 has no `enable_gqa` there, so K/V heads are repeated for this backend when the argument is missing.
- `flex`: FlexAttention with a document mask (compiled on CUDA). On CPU it runs forward only, unfused: PyTorch
  has no FlexAttention backward on CPU and raises if a gradient is needed. It is listed for CPU because
  inference and tests can use it; `auto` never picks it there.
- `xformers`: `memory_efficient_attention` with a `BlockDiagonalCausalMask`, when the optional extra is
  installed; K/V heads are repeated, as mistral-inference does.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from functools import cache

import torch
import torch.nn.functional as F

from model.settings import BACKENDS

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

_compiled_flex = None


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@cache
def _varlen():
    """`varlen_attn` and the names of its arguments, imported when the backend is first used: importing
    torch.nn.attention.varlen loads torch._dynamo, over a second that a CPU run or `tailor validate` never needs."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


@cache
def _xformers():
    """xformers' attention and its block-diagonal mask, imported when the backend is first used."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    return xops.memory_efficient_attention, BlockDiagonalCausalMask


def available_backends(
    device: torch.device | str, dtype: torch.dtype | None = None, capability: tuple[int, int] | None = None
) -> list[str]:
    """List the attention backends usable on `device`, the one `auto` picks first.

    Args:
        dtype: the activations' dtype when known (`varlen` needs fp16 or bf16).
        capability: the GPU's compute capability; asked of the device when not given (a traced step names the GPU
            it traces for).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return ["sdpa"] + (["flex"] if flex_attention is not None else [])
    capability = capability or torch.cuda.get_device_capability(device)
    found = []
    if _installed("torch.nn.attention.varlen") and dtype in (None, torch.float16, torch.bfloat16):
        if capability >= (8, 0):
            found.append("varlen")
    if _installed("xformers") and capability < (8, 0):
        found.append("xformers")
    # Below 8.0 (T4, V100) Triton's compiled flex kernels run out of shared memory: named, it is tried; `auto` takes
    # SDPA's memory-efficient kernel there
    flex = ["flex"] if flex_attention is not None else []
    if capability < (8, 0):
        return found + ["sdpa"] + flex
    return found + flex + (["xformers"] if _installed("xformers") else []) + ["sdpa"]


def resolve_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    capability: tuple[int, int] | None = None,
) -> str:
    """Return the backend `name` stands for on `device`: `auto` gives the fastest available one.

    Raises:
        ValueError: `name` is unknown, or not available on `device` (with `dtype`).
    """
    available = available_backends(device, dtype, capability)
    if name == "auto":
        return available[0]
    if name not in available:
        where = f"{torch.device(device)}" + (f" with {dtype}" if dtype is not None else "")
        kind = "unknown" if name not in BACKENDS else f"not available on {where}"
        raise ValueError(f"attention backend {name!r} is {kind}; available: {available} (or 'auto')")
    return name


class DocumentMask:
    """Who attends to whom in one packed batch, prepared for one backend.

    Made once per forward and shared by all layers: building an N x N mask or a flex BlockMask per layer would cost
    as much as the attention.

    Args:
        seqlens: the lengths of the documents packed in the batch, in order.
        backend: a resolved backend name (see `resolve_backend`).
        sliding_window: how many tokens back (itself included) a token sees; None for the whole document.

    Raises:
        ValueError: a length is not positive, or the backend is unknown.
    """

    def __init__(self, seqlens: list[int], backend: str, sliding_window: int | None, device: torch.device):
        if not seqlens or min(seqlens) <= 0:
            raise ValueError(f"seqlens must be positive document lengths, got {seqlens}")
        self.seqlens, self.backend, self.sliding_window = list(seqlens), backend, sliding_window
        if backend == "sdpa":
            self.doc = document_ids(self.seqlens, device)  # for a compiled block (see attend)
            starts = [0, *itertools.accumulate(self.seqlens)][:-1]
            self.documents = [
                (start, length, _band_mask(length, sliding_window, device))
                for start, length in zip(starts, self.seqlens)
            ]
        elif backend == "varlen":
            self.cu_seqlens = to_device(F.pad(torch.tensor(self.seqlens).cumsum(0), (1, 0)).to(torch.int32), device)
            self.max_seqlen = max(self.seqlens)
        elif backend == "flex":
            self.block_mask = _flex_block_mask(document_ids(self.seqlens, device), sliding_window)
        elif backend == "xformers":
            bias = _xformers()[1].from_seqlens(self.seqlens)
            self.bias = bias.make_local_attention(sliding_window) if sliding_window else bias
        else:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend every packed token to the tokens of its document that the mask allows.

        Args:
            q: [N, n_heads, head_dim].
            k, v: [N, n_kv_heads, head_dim].

        Returns:
            [N, n_heads, head_dim].

        Raises:
            ValueError: `varlen` with a sliding window on a PyTorch whose varlen_attn has no window_size.
        """
        repeats = q.shape[1] // k.shape[1]
        if self.backend == "sdpa":
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, N, head_dim]: views
            if torch.compiler.is_compiling():
                # Compiled, a loop over documents would recompile for every number of documents: one block-diagonal
                # mask made in the graph from the document ids (only N is guarded) instead.
                idx = torch.arange(q.shape[2], device=q.device)
                mask = _allowed(self.doc, idx[:, None], idx[None, :], self.sliding_window)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=repeats > 1)[0].transpose(
                    0, 1
                )
            outs = [
                F.scaled_dot_product_attention(
                    *(t[:, :, start : start + length] for t in (q, k, v)),
                    attn_mask=band,
                    is_causal=band is None,
                    enable_gqa=repeats > 1,
                )[0].transpose(0, 1)
                for start, length, band in self.documents
            ]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if self.backend == "varlen":
            varlen_attn, varlen_args = _varlen()
            kwargs = {}
            if "enable_gqa" in varlen_args:
                kwargs["enable_gqa"] = repeats > 1
            else:
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            if "window_size" in varlen_args:
                kwargs["window_size"] = (self.sliding_window - 1 if self.sliding_window else -1, 0)
            elif self.sliding_window:
                raise ValueError("this PyTorch's varlen_attn has no window_size: use another attention backend")
            else:
                kwargs["is_causal"] = True
            cu, m = self.cu_seqlens, self.max_seqlen
            return varlen_attn(q, k, v, cu, cu, m, m, **kwargs)
        if self.backend == "flex":
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            flex = _compiled_flex_attention() if q.is_cuda else flex_attention
            return flex(q, k, v, block_mask=self.block_mask, enable_gqa=repeats > 1)[0].transpose(0, 1)
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return _xformers()[0](q[None], k[None], v[None], attn_bias=self.bias)[0]


def document_ids(seqlens: list[int], device: torch.device | str) -> torch.Tensor:
    """The document of every packed token: [0] * L0 + [1] * L1 + ..., made on the CPU (see to_device)."""
    return to_device(torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens)), device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor (document lengths and what is made from them, a batch) to `device` without a host wait.

    The copy goes through pinned memory. Such tensors are made on the CPU on purpose: a blocking copy to a GPU, or an
    op whose output size depends on GPU data (repeat_interleave, nonzero), waits for all the work queued before it.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _allowed(doc: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor, sliding_window: int | None):
    """Same document, not in the future, and (with a window W) fewer than W tokens back."""
    ok = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    if sliding_window:
        ok = ok & (q_idx - kv_idx < sliding_window)
    return ok


def _band_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """The L x L mask of one document when a sliding window cuts into it; None when plain causal attention is it."""
    if not sliding_window or length <= sliding_window:
        return None
    back = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (back >= 0) & (back < sliding_window)


def _flex_block_mask(doc: torch.Tensor, sliding_window: int | None):
    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(doc, q_idx, kv_idx, sliding_window)

    n = len(doc)
    return create_block_mask(mask_mod, None, None, n, n, device=doc.device, _compile=doc.is_cuda)


def _compiled_flex_attention():
    """Eager FlexAttention materialises the N x N scores; on CUDA it is only fast once compiled."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
