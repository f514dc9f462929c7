import pytest
import torch

from model.generate import KVCache, generate

PROMPT_LENGTHS = [5, 11, 3]


def prompts_of(random_tokens, lengths=PROMPT_LENGTHS):
    return [random_tokens(n, seed=i).tolist() for i, n in enumerate(lengths)]


@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "mixtral-8x7b"])
def test_cached_decoding_equals_full_forward(arch, make_model, random_tokens):
    """Prefill prompts of different lengths, then feed chunks of 1 to 3 tokens per sequence: every cached logit
    equals the full forward over the whole sequence (past the sliding window of 8 for v0.1)."""
    model = make_model(arch)
    sequences = prompts_of(random_tokens)
    cache = KVCache(model.args, len(sequences), 32, "cpu", torch.float32)
    steps = [PROMPT_LENGTHS, [1, 1, 1], [2, 3, 1], [1, 1, 1], [3, 1, 2]]
    extra = iter(random_tokens(100, seed=9).tolist())
    cached = [[] for _ in sequences]
    with torch.no_grad():
        for step, seqlens in enumerate(steps):
            if step:  # append new tokens to every sequence
                new = [[next(extra) for _ in range(n)] for n in seqlens]
                sequences = [s + n for s, n in zip(sequences, new)]
            chunk = [t for s, n in zip(sequences, seqlens) for t in s[len(s) - n :]]
            logits = model(torch.tensor(chunk), seqlens, cache=cache)
            for b, part in enumerate(logits.split(seqlens)):
                cached[b].append(part)
        for b, seq in enumerate(sequences):
            full = model(torch.tensor(seq), [len(seq)])
            torch.testing.assert_close(torch.cat(cached[b]), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [len(s) for s in sequences] and max(cache.lengths) > 8


def test_greedy_generation_equals_step_by_step_full_forward(make_model, random_tokens):
    model = make_model("mistral-7b-v0.1")
    prompts = prompts_of(random_tokens)
    outputs = generate(model, prompts, max_tokens=12, eos_id=-1)
    for prompt, output in zip(prompts, outputs):
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                tokens.append(int(model(torch.tensor(tokens), [len(tokens)])[-1].argmax()))
        assert output == tokens[len(prompt) :]


def test_each_sequence_stops_at_eos(make_model, random_tokens):
    model = make_model("mistral-7b")
    prompts = prompts_of(random_tokens)
    free = generate(model, prompts, max_tokens=6, eos_id=-1)
    eos = free[1][2]  # the third token of the second sequence
    stopped = generate(model, prompts, max_tokens=6, eos_id=eos)
    for before, after in zip(free, stopped):
        assert after == (before[: before.index(eos)] if eos in before else before)
    assert len(stopped[1]) <= 2


def test_every_step_makes_all_forwards_after_eos_and_forward_runs_the_model(make_model, random_tokens):
    """The ranks of a sharded model generate through its root and make the same calls whatever their answers."""
    model = make_model("mistral-7b")
    prompts = prompts_of(random_tokens)
    free = generate(model, prompts, max_tokens=6, eos_id=-1)
    eos = free[0][1]
    calls = []

    def forward(*args, **kwargs):
        calls.append(args[1])
        return model(*args, **kwargs)

    stopped = generate(model, prompts, max_tokens=6, eos_id=eos)
    assert generate(model, prompts, max_tokens=6, eos_id=eos, forward=forward, every_step=True) == stopped
    assert len(calls) == 6 and calls[1:] == [[1] * len(prompts)] * 5  # the prompts, then a token each per step


def test_sampling_is_reproducible_and_top_p_keeps_the_best(make_model, random_tokens):
    model = make_model("mixtral-8x7b").train()
    prompts = prompts_of(random_tokens)
    a = generate(model, prompts, 8, eos_id=-1, temperature=1.0, seed=5)
    assert a == generate(model, prompts, 8, eos_id=-1, temperature=1.0, seed=5)
    assert a != generate(model, prompts, 8, eos_id=-1, temperature=1.0, seed=6)
    assert generate(model, prompts, 8, eos_id=-1, temperature=1.0, top_p=1e-6, seed=7) == generate(
        model, prompts, 8, eos_id=-1
    )
    assert model.training  # generate ran in eval mode and restored the mode


def test_cache_overflow_is_an_error(make_model):
    model = make_model("mistral-7b")
    cache = KVCache(model.args, 1, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache full: 5 tokens for a capacity of 4"):
        model(torch.zeros(5, dtype=torch.long), [5], cache=cache)
