import pytest
import torch
import torch.nn.functional as F

from model.attention import available_backends
from model.transformer import document_positions

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQLENS = [13, 1, 20, 6]  # longer and shorter than the tiny sliding window of 8


def test_document_positions_restart_in_each_document():
    assert document_positions([3, 1, 2], "cpu").tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "mistral-7b", "nemo-12b", "mixtral-8x7b"])
def test_packed_logits_equal_each_document_alone(arch, make_model, random_tokens):
    model = make_model(arch)
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        packed = model(tokens, SEQLENS)
        alone = torch.cat([model(doc, [len(doc)]) for doc in tokens.split(SEQLENS)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_sliding_window_changes_long_documents_only(make_model, random_tokens):
    windowed, full = make_model("mistral-7b-v0.1"), make_model("mistral-7b-v0.1", sliding_window=None)
    tokens = random_tokens(20)
    with torch.no_grad():
        a, b = windowed(tokens, [20]), full(tokens, [20])
    torch.testing.assert_close(a[:8], b[:8], rtol=1e-5, atol=1e-5)  # the first 8 tokens see everything anyway
    assert (a[8:] - b[8:]).abs().amax() > 1e-2


def test_hidden_states_are_the_input_of_the_output_head(make_model, random_tokens):
    model = make_model("mistral-7b")
    tokens = random_tokens(12)
    with torch.no_grad():
        hidden = model.hidden_states(tokens, [5, 7])
        torch.testing.assert_close(model.output(hidden), model(tokens, [5, 7]), rtol=0, atol=0)
    assert hidden.shape == (12, model.args.dim)


def test_moe_equals_naive_per_token_reference(make_model):
    moe = make_model("mixtral-8x7b").layers[0].feed_forward
    x = torch.randn(40, moe.gate.in_features, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros_like(x)
    for t in range(len(x)):  # mistral-inference's definition: softmax over the top-k gate logits
        logits, experts = moe.gate(x[t]).topk(moe.top_k)
        for weight, e in zip(F.softmax(logits, dim=-1), experts.tolist()):
            expected[t] += weight * moe.experts[e](x[t : t + 1])[0]
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_stays_close_to_fp32(make_model, random_tokens):
    model = make_model("mixtral-8x7b")
    tokens = random_tokens(sum(SEQLENS))
    with torch.no_grad():
        fp32 = model(tokens, SEQLENS)
        bf16 = model.to(torch.bfloat16)(tokens, SEQLENS)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.15)


def test_no_buffers_so_meta_init_needs_only_weights(make_model):
    assert list(make_model("mixtral-8x7b").buffers()) == []


def test_inconsistent_seqlens_are_refused(make_model, random_tokens):
    with pytest.raises(ValueError, match="sum\\(seqlens\\) = 9"):
        make_model("mistral-7b")(random_tokens(10), [4, 5])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "mixtral-8x7b"])
def test_every_gpu_backend_gives_the_sdpa_logits(arch, make_model, random_tokens):
    tokens = random_tokens(sum(SEQLENS)).cuda()
    logits = {}
    for backend in available_backends("cuda", torch.bfloat16):
        model = make_model(arch, backend=backend).to("cuda", torch.bfloat16)
        with torch.no_grad():
            logits[backend] = model(tokens, SEQLENS).float()
    for backend, got in logits.items():
        torch.testing.assert_close(got, logits["sdpa"], rtol=0.05, atol=0.1, msg=backend)
