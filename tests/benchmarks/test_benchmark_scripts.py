"""The benchmark scripts keep running (their numbers go to benchmarks/RESULTS.md; nothing here is timed)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_loss_memory_benchmark_meets_its_goal_at_reduced_size_on_cpu():
    """Each shipped config at its seq_len and vocabulary, in chunks of the default size (both divided by 8 on a CPU):
    Nemo's 131072-token vocabulary at 16384 tokens, 16 chunks, is at most 1/8 of the naive path."""
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--arch", "nemo-12b", "--loss-memory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(
        r"2048 tokens x 131072 vocab.*naive (\d+\.\d+) GiB, chunked (\d+\.\d+) GiB \((\d\.\d+) of naive", result.stdout
    )
    assert found, result.stdout
    naive, chunked, ratio = map(float, found.groups())
    assert naive > 2.0  # the fp32 logits alone are 1 GiB: the probe sees them
    assert ratio <= 0.125 and chunked < 0.25  # two [128, 131072] fp32 chunks, 64 MiB each, and the gradients
    assert len(re.findall(r"of naive; goal <= 0.125", result.stdout)) == 5  # every shipped config


def test_the_qlora_quality_benchmark_finds_nf4_and_its_dequantized_control_the_same_run(tmp_path):
    """Two steps of the demo task on an NF4 base and on a bf16 base holding deq(nf4(W)): the same losses, gradient
    norms and final adapters bit for bit (the NF4 code path adds nothing to its base's error), each with its held-out
    answers counted; the run folders kept where --keep says, and read again by --trained."""
    pytest.importorskip("torchao", reason="NF4 is the qlora extra")

    def benchmark(*extra: str) -> str:
        command = ["--steps", "2", "--skip-layers", "--variants", "nf4", "bf16 on deq(nf4(W))", "--keep", str(tmp_path)]
        result = subprocess.run(
            [sys.executable, "benchmarks/qlora_quality.py", *command, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    trained = benchmark()
    assert re.search(r"seed 0, nf4: eval loss step 1 \d\.\d{4}, step 2 \d\.\d{4}", trained), trained
    assert len(re.findall(r"held-out answers exactly right \d+/32, greeting right \d+/32", trained)) == 2
    assert (
        "nf4 and bf16 on deq(nf4(W)): the same train loss and gradient norm at all 2 steps; "
        "final adapters (30 tensors) bitwise equal" in trained
    )
    assert (tmp_path / "nf4-seed0" / "checkpoints" / "checkpoint_000002" / "lora.safetensors").is_file()
    assert benchmark("--trained") == trained


def _data_throughput():
    """benchmarks/data_throughput.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_throughput", REPO / "benchmarks" / "data_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_data_benchmarks_references_make_tailors_tokens(tmp_path):
    """Both restatements of mistral-finetune's data path tokenize the generated chats into exactly the tokens tailor
    makes of them, so the benchmark compares the same work; its mask trains exactly tailor's trained tokens."""
    from finetune.data import load_tokenizer, tokenize_sample

    bench = _data_throughput()
    data = tmp_path / "chat.jsonl"
    bench.make_chat_file(data, 12)
    tokenizer = load_tokenizer(bench.make_model_folder(tmp_path / "model", bench.TOKENIZERS["SentencePiece v3"]))
    samples = [json.loads(line) for line in data.read_text().splitlines()]
    ours = [tokenize_sample(sample, tokenizer) for sample in samples]
    built = [bench.build_sample_as_mistral_finetune(sample) for sample in samples]
    instruct = tokenizer.instruct_tokenizer
    theirs = [bench.tokenize_as_mistral_finetune(b.messages, b.system_prompt, b.only_last, instruct) for b in built]
    for mine, (tokens, mask) in zip(ours, theirs):
        assert mine.tokens == tokens
        assert [w > 0 for w in mine.weights] == mask
    n_tokens = sum(len(tokens) for tokens, _ in theirs)
    assert bench.build_dataset_path(data, tokenizer, 8192)[1] == n_tokens
    assert bench.reference_path(data, tokenizer)[1] == n_tokens


def test_the_data_benchmarks_packing_is_mistral_finetunes():
    """sequence_iterator's rules: inputs tokens[:-1] against mask[1:], pieces that train nothing dropped, a sequence
    counted when it is full and trains something."""
    pack = _data_throughput().pack_as_mistral_finetune
    t, f = True, False
    # 5 inputs per sample, 4 per sequence: [a0..a3] full, then a4 + b0..b2, then b3 + c... c is all masked: dropped
    samples = [(list(range(6)), [f, f, t, t, t, t]), (list(range(6)), [f, t, t, t, t, t]), (list(range(6)), [f] * 6)]
    assert pack(samples, 4) == 2
    assert pack(samples, 3) == 3  # [a0 a1 a2] [a3 a4 b0] [b1 b2 b3]; b4 waits; c trains nothing
    assert pack([(list(range(9)), [f] * 9)], 4) == 0


def test_the_data_benchmarks_rounds_alternate_and_pair_each_wall_with_its_own_path():
    """Every other round runs backwards; each wall stays with the path that took it, so the paired ratios of a round
    divide that round's reference wall by that round's path wall (the middle round is reversed, its walls the odd
    ones out: a mix-up would show)."""
    bench = _data_throughput()
    walls_by_round = {"reference": [2.0, 6.0, 3.0], "fast": [1.0, 2.0, 1.0], "slow": [4.0, 3.0, 12.0]}
    order = []

    def run(label):
        order.append(label)
        return walls_by_round[label][sum(seen == label for seen in order) - 1]

    walls = bench.alternating_rounds(run, ["reference", "fast", "slow"], 3)
    assert order == ["reference", "fast", "slow", "slow", "fast", "reference", "reference", "fast", "slow"]
    assert walls == walls_by_round
    paired = bench.paired_ratios(walls, "reference")
    assert paired["fast"] == (3.0, 2.0, 3.0)  # rounds 2/1, 6/2, 3/1
    assert paired["slow"] == (0.5, 0.25, 2.0)  # rounds 2/4, 6/3, 3/12
    assert paired["reference"] == (1.0, 1.0, 1.0)
    assert bench.paired_ratios({"reference": [2.0, 4.0], "path": [1.0, 1.0]}, "reference")["path"] == (3.0, 2.0, 4.0)


def test_the_data_benchmark_times_the_tokenizers_it_is_given():
    bench = _data_throughput()
    assert bench.parse_args([]).tokenizers == ["SentencePiece v3", "Tekken"]
    assert bench.parse_args(["--tokenizers", "Tekken"]).tokenizers == ["Tekken"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokenizers", "tekken"])
