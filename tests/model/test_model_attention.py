import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from model.attention import DocumentMask, available_backends, resolve_backend
from model.settings import BACKENDS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQLENS = [5, 1, 11, 7]


def qkv(n, n_heads=4, n_kv_heads=2, head_dim=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, n_heads, head_dim), (n, n_kv_heads, head_dim), (n, n_kv_heads, head_dim)]
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def attention(q, k, v, seqlens, backend, sliding_window):
    """What a Transformer layer computes: the backend resolved for the device and dtype, then its DocumentMask."""
    return DocumentMask(seqlens, resolve_backend(backend, q.device, q.dtype), sliding_window, q.device).attend(q, k, v)


def naive_attention(q, k, v, seqlens, sliding_window):
    """Token by token: softmax over the keys of the same document at most `sliding_window - 1` positions back."""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    out, start = torch.empty_like(q), 0
    for length in seqlens:
        for i in range(start, start + length):
            first = start if sliding_window is None else max(start, i - sliding_window + 1)
            scores = torch.einsum("hd,thd->ht", q[i], k[first : i + 1]) / math.sqrt(q.shape[-1])
            out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v[first : i + 1])
        start += length
    return out


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_sdpa_equals_naive_reference(sliding_window):
    q, k, v = qkv(sum(SEQLENS))
    expected = naive_attention(q, k, v, SEQLENS, sliding_window)
    got = attention(q, k, v, SEQLENS, "sdpa", sliding_window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 3, 11])
def test_sdpa_per_document_gradients_equal_naive_reference(sliding_window):
    """sdpa runs one causal attention per document (a band mask only where the window cuts into a document): the
    gradients of q, k and v, which training needs, are those of attending token by token."""
    seqlens = [5, 1, 11, 7, 16]  # a window of 11 cuts into the 16 only; 3 into all but the 1
    grads = {}
    for name in ("naive", "sdpa"):
        q, k, v = (t.requires_grad_() for t in qkv(sum(seqlens)))
        if name == "naive":
            out = naive_attention(q, k, v, seqlens, sliding_window)
        else:
            out = attention(q, k, v, seqlens, "sdpa", sliding_window)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads[name] = [out, q.grad, k.grad, v.grad]
    for got, expected in zip(grads["sdpa"], grads["naive"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "sdpa"])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_cpu_backends_equal_sdpa(backend, sliding_window):
    q, k, v = qkv(sum(SEQLENS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns that it runs unfused without torch.compile
        got = attention(q, k, v, SEQLENS, backend, sliding_window)
    torch.testing.assert_close(got, attention(q, k, v, SEQLENS, "sdpa", sliding_window), rtol=1e-5, atol=1e-5)


def test_backend_resolution():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert set(available_backends("cpu")) <= set(BACKENDS)
    with pytest.raises(ValueError, match=r"'nope' is unknown; available: \['sdpa'"):
        resolve_backend("nope", "cpu")
    with pytest.raises(ValueError, match="'varlen' is not available on cpu"):
        resolve_backend("varlen", "cpu")


def test_bad_seqlens_are_refused():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="positive document lengths"):
        attention(q, k, v, [4, 0], "sdpa", None)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["varlen", "flex", "xformers"])
@pytest.mark.parametrize("sliding_window", [None, 64])
def test_gpu_backends_equal_sdpa_forward_and_backward(backend, sliding_window):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not available on this GPU")
    seqlens = [100, 3, 260, 149]
    out_grad = torch.randn(sum(seqlens), 8, 128, generator=torch.Generator().manual_seed(1)).cuda()
    results = {}
    for name in ("sdpa", backend):
        q, k, v = (t.requires_grad_() for t in qkv(sum(seqlens), 8, 2, 128, "cuda", torch.bfloat16))
        out = attention(q, k, v, seqlens, name, sliding_window)
        out.backward(out_grad.to(out.dtype))
        results[name] = [out, q.grad, k.grad, v.grad]
    for got, expected in zip(results[backend], results["sdpa"]):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_auto_on_gpu_prefers_a_fused_backend():
    assert resolve_backend("auto", "cuda", torch.bfloat16) == available_backends("cuda", torch.bfloat16)[0]
    assert "varlen" not in available_backends("cuda", torch.float32)  # flash kernels are fp16/bf16 only


def flash_varlen_reference(
    q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, is_causal=False
):
    """flash attention's varlen contract, on the CPU: documents cut by cu_seqlens (int32); query i of a document sees
    its keys in [i - window_size[0], i + window_size[1]] (-1: no limit), or the keys up to i when is_causal; with
    enable_gqa, query head h reads K/V head h // (heads / kv heads), otherwise the heads must be equal."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    if k.shape[1] != q.shape[1]:
        assert enable_gqa
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    left, right = (-1, 0) if is_causal else window_size
    out = torch.empty_like(q)
    for start, end in zip(bounds, bounds[1:]):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
        scores = torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hij,jhd->ihd", weights, v[start:end])
    return out


@pytest.mark.parametrize("torch_has", ["window_size and enable_gqa", "neither"])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_the_varlen_backend_asks_flash_attention_for_the_right_thing(monkeypatch, torch_has, sliding_window):
    """The GPU kernel is not here, but what tailor passes it is: cu_seqlens, max length, the window (flash counts
    W - 1 keys back), causality and GQA, checked against flash attention's contract."""
    import model.attention as attention_module

    arguments = {"is_causal"} if torch_has == "neither" else {"window_size", "enable_gqa"}
    monkeypatch.setattr(attention_module, "_varlen", lambda: (flash_varlen_reference, arguments))
    q, k, v = qkv(sum(SEQLENS))
    mask = attention_module.DocumentMask(SEQLENS, "varlen", sliding_window, torch.device("cpu"))
    if torch_has == "neither" and sliding_window:
        with pytest.raises(ValueError, match="has no window_size: use another attention backend"):
            mask.attend(q, k, v)
        return
    expected = naive_attention(q, k, v, SEQLENS, sliding_window)
    torch.testing.assert_close(mask.attend(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_importing_the_model_and_training_loads_no_attention_backend():
    """torch.nn.attention.varlen loads torch._dynamo (over a second of start-up, for every command): it and
    xformers are imported when their backend is first used, never by importing train.py, the CLI or the model."""
    code = (
        "import sys, train, finetune.cli, model.generate\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch.nn.attention.varlen', 'xformers') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
