"""End to end: train.py in one process, under torchrun with 2 ranks, and as 2 nodes on one machine."""

import json
import subprocess
import sys

import pytest
import yaml
from launching import REPO, free_port, records, subprocess_env, torchrun
from safetensors.torch import load_file

from finetune.data import load_tokenizer, tokenize_sample
from model.args import load_model_args, num_parameters

TIMEOUT = 600


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_one_process_learns_and_writes_checkpoints(write_config, tmp_path):
    config = write_config()
    result = run([sys.executable, "train.py", str(config)])
    run_dir = tmp_path / "run"

    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 17))
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-3:]) / 3
    assert first > 8.0 and last < 0.6 * first, (first, last)
    base, *evals = records(run_dir, "eval")
    assert base["step"] == 0 and base["base"] and base["eval_loss"] > evals[0]["eval_loss"]  # LoRA off: the base
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[1]["eval_loss"], rel=1e-6)

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_000008", "checkpoint_000016"]
    final = run_dir / "checkpoints" / "checkpoint_000016"
    adapter = load_file(final / "lora.safetensors")
    assert len(adapter) == 2 * (2 * 7 + 1)  # A and B for 7 modules in 2 layers, and the output head
    assert adapter["layers.0.attention.wq.lora_A.weight"].shape == (8, 64)
    assert adapter["layers.1.feed_forward.w2.lora_B.weight"].abs().sum() > 0
    params = json.loads((final / "params.json").read_text())
    assert params["lora"] == {
        "rank": 8,
        "alpha": 16.0,
        "scaling": 2.0,
        "dropout": 0.0,
        "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"],
        "rslora": False,
        "dora": False,
    }
    assert params["vocab_size"] == 32768
    assert (final / "tokenizer.model.v3").is_file()
    assert "final eval loss" in result.stdout and str(final.relative_to(tmp_path)) in result.stdout.replace(
        str(tmp_path) + "/", ""
    )
    assert (run_dir / "config.yaml").is_file()
    model_dir = yaml.safe_load(config.read_text())["model"]["path"]
    assert f"  chat with it: tailor chat {model_dir} --adapter {final}" in result.stdout.splitlines()
    check_the_report_before_step_1(result.stdout, adapter, tmp_path)


def check_the_report_before_step_1(stdout: str, adapter: dict, tmp_path) -> None:
    """The plan printed before step 1, checked against the adapter saved and the data tokenized here."""
    report = stdout[: stdout.index("step  1/16")]
    model_dir = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["path"]
    trainable = sum(t.numel() for t in adapter.values())
    base = num_parameters(load_model_args(model_dir))
    tokenizer = load_tokenizer(model_dir)
    samples = [json.loads(line) for line in (REPO / "data/demo/train.jsonl").read_text().splitlines()]
    tokens = sum(len(tokenize_sample(s, tokenizer).tokens) for s in samples)
    expected = [
        "devices: 1 process on the CPU (world size 1); frozen weights fp32, LoRA weights fp32",
        f"LoRA: rank 8, alpha 16 on wq wk wv wo w1 w2 w3 output: {trainable:,} trainable parameters "
        f"({trainable / (base + trainable):.2%} of {(base + trainable) / 1e6:.2f}M)",
        f"step: seq_len 128 x batch_size 2 x grad_accumulation 1 x 1 rank = 256 tokens; 16 steps = 4,096 tokens, "
        f"{4096 / tokens:.2f} epochs of {REPO / 'data/demo/train.jsonl'}",
        "eval: 2 batches of 2 sequences per rank, every 8 steps and at the end",
    ]
    for line in expected:
        assert line in report.splitlines(), f"{line!r} not in\n{report}"
    assert f"Mistral, 2 layers, dim 64, 4 heads (2 KV), vocab 32,768: {base / 1e6:.2f}M parameters" in report


def test_checkpoint_rotation_keeps_the_newest(write_config, tmp_path):
    config = write_config(max_steps=6, checkpoint__freq=2, checkpoint__keep=2, eval__enabled=False)
    run([sys.executable, "train.py", str(config)])
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_000004", "checkpoint_000006"]


def test_two_ranks_with_torchrun_learn(write_config, tmp_path):
    config = write_config(batch_size=1)
    run(torchrun(config))
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 17))
    assert train[0]["tokens"] == 2 * 128  # one sequence per rank
    assert sum(r["loss"] for r in train[-3:]) / 3 < 0.6 * train[0]["loss"]
    assert [r["step"] for r in records(tmp_path / "run", "eval")] == [0, 8, 16]  # the base model's, then two
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_000016" / "lora.safetensors").is_file()


def test_two_nodes_on_one_machine(write_config, tmp_path):
    """Two torchrun agents, one per "node", meeting over loopback with the c10d rendezvous."""
    config = write_config(batch_size=1, max_steps=4, eval__enabled=False, checkpoint__freq=4)
    endpoint = f"127.0.0.1:{free_port()}"
    env = subprocess_env()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "tailor-test",
                "train.py",
                str(config),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["tokens"] == 2 * 128
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_000004" / "lora.safetensors").is_file()
