"""`tailor validate` and `tailor tokenize`, as a user runs them."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.data import tokenize_sample
from finetune.validate_command import GPU_DEVICE_FILES

REPO = Path(__file__).resolve().parents[2]

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find a word",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}
LEGACY = {
    "functions": [TOOL["function"]],
    "messages": [
        {"role": "user", "content": "Define cat"},
        {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": '{"word": "cat"}'}},
        {"role": "function", "name": "lookup", "content": "a small feline"},
        {"role": "assistant", "content": "A cat is a small feline."},
    ],
}
NO_IDS = {
    "tools": [TOOL],
    "messages": [
        {"role": "user", "content": "Define dog"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"word": "dog"}}}],
        },
        {"role": "tool", "content": "a loyal canine"},
        {"role": "assistant", "content": "A dog is a loyal canine."},
    ],
}


def write_config(tmp_path: Path, model_dir: Path, train: list[Path], eval_: list[Path]) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir)},
        "seq_len": 64,
        "max_steps": 10,
        "batch_size": 2,
        "data": {"train": [str(p) for p in train], "eval": [str(p) for p in eval_]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_reports_faults_statistics_epochs_and_eta(tmp_path, model_dirs, write_jsonl, chat, capsys):
    train = write_jsonl(
        tmp_path / "data" / "train.jsonl",
        [
            chat(0),
            chat(1, words=40),
            LEGACY,
            "{broken",
            {"messages": [{"role": "bot", "content": "hi"}]},
            "",
            NO_IDS,
            chat(2),
        ],
    )
    eval_ = write_jsonl(tmp_path / "data" / "eval.jsonl", [chat(3)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [eval_])
    assert main(["validate", str(config), "--gpus", "2", "--device", "h100"]) == 1
    out = capsys.readouterr().out
    assert f'{train}:3: sample uses OpenAI\'s legacy function-calling form ("functions")' in out
    assert f"{train}:4: invalid JSON: Expecting property name enclosed in double quotes at column 2" in out
    assert f"{train}:5: message 1 has role 'bot'; expected system, user, assistant or tool" in out
    assert f"{train}:6: blank line" in out
    assert f"{train}:7: message 2 tool call 1 has no id" in out
    assert "5 bad lines (" in out and "2 have a safe repair (--fix OUT_DIR applies it)" in out  # not the blank line
    header, train_row = [line for line in out.splitlines() if line.startswith("file") or " train " in line]
    assert header.split() == ["file", "split", "lines", "bad", "samples", "tokens", "trained", ">", "seq_len", "64"]
    assert train_row.split()[:5] == [str(train), "train", "8", "5", "3"]
    assert train_row.split()[-1] == "1"  # chat(1) is longer than seq_len
    assert "max_steps 10 x 2 rank(s) x batch_size 2 x grad_accumulation 1 x seq_len 64 = 2,560 tokens" in out
    assert "epochs" in out and "ETA on 2 x H100: 1 min" in out and "at 40% of H100 bf16 peak; not measured" in out


def test_validate_warns_that_servers_refuse_lora_on_the_output_head(tmp_path, model_dirs, write_jsonl, chat, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [train])
    assert main(["validate", str(config), "--device", "cpu"]) == 0
    assert "output head" not in capsys.readouterr().out
    assert main(["validate", str(config), "lora.targets=[wq,wv,output]", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"warning: {config}: LoRA on the output head (lora.targets has 'output'): vLLM and most")


def test_the_eta_names_its_device(tmp_path, model_dirs, write_jsonl, chat, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [train])
    assert main(["validate", str(config), "--device", "cpu"]) == 0
    assert gc.isenabled()  # validate pauses Python's cyclic garbage collector for its own run only
    assert "ETA on 1 x CPU: not estimated, tailor has no figures for the CPU; --device h100, h200 or a100" in (
        capsys.readouterr().out
    )
    etas = {}
    for device in ("h100", "a100"):
        assert main(["validate", str(config), "--device", device, "--gpus", "2"]) == 0
        eta = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ETA on"))
        assert eta.startswith(f"ETA on 2 x {device.upper()}: ") and f"of {device.upper()} bf16 peak" in eta
        etas[device] = float(eta.split(" at ")[1].split(" tokens/s")[0].replace(",", ""))
    assert etas["h100"] / etas["a100"] == pytest.approx(989 / 312, rel=1e-3)  # the GPUs' dense bf16 peaks
    assert main(["validate", str(config), "--device", "t4", "--gpus", "2"]) == 0  # a T4 has fp16, no bf16
    eta = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ETA on"))
    assert eta.startswith("ETA on 2 x T4: ") and "of T4 fp16 peak" in eta
    assert etas["h100"] / float(eta.split(" at ")[1].split(" tokens/s")[0].replace(",", "")) == pytest.approx(
        989 / 65, rel=1e-3
    )


def test_an_empty_train_or_eval_file_fails_validation_as_training_refuses_it(
    tmp_path, model_dirs, write_jsonl, chat, capsys
):
    train, eval_ = tmp_path / "train.jsonl", write_jsonl(tmp_path / "eval.jsonl", [chat(0)])
    train.write_text("")
    assert main(["validate", str(write_config(tmp_path, model_dirs["v3"], [train], [eval_]))]) == 1
    assert f"{train}: 0 usable samples cannot be shared by 1 rank(s): training refuses" in capsys.readouterr().out
    config = write_config(tmp_path, model_dirs["v3"], [eval_], [train])  # an empty eval file, eval on
    assert main(["validate", str(config)]) == 1
    assert f"{train}: no usable sample to evaluate on: training refuses this eval source" in capsys.readouterr().out
    assert main(["validate", str(config), "eval.enabled=false"]) == 0


def test_warnings_are_summed_up_with_what_training_does_with_their_lines(
    tmp_path, model_dirs, write_jsonl, chat, capsys
):
    typo = chat(1)
    typo["messages"][-1]["wieght"] = 0
    untrained = chat(2)
    untrained["messages"][-1]["weight"] = 0
    train = write_jsonl(tmp_path / "train.jsonl", [chat(0), typo, chat(3)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [train])
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{train}:2: warning: message 2 (assistant): key 'wieght' is not read; did you mean 'weight'?" in out
    assert "1 warnings (unknown_key 1); these lines are trained as read; warnings do not change the exit" in out
    write_jsonl(train, [chat(0), typo, untrained, chat(3)])
    assert main(["validate", str(config)]) == 0
    assert (
        "2 warnings (unknown_key 1, nothing_to_train 1); 1 of these lines are left out of training, the others are "
        "trained as read"
    ) in capsys.readouterr().out


def test_validate_fix_repairs_and_removes(tmp_path, model_dirs, tokenizers, write_jsonl, chat, capsys):
    train = write_jsonl(
        tmp_path / "data" / "train.jsonl", [chat(0), LEGACY, "{broken", "", NO_IDS, "\ufeff" + json.dumps(chat(1))]
    )
    eval_ = write_jsonl(tmp_path / "data" / "more" / "eval.jsonl", [chat(3)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [eval_])
    assert main(["validate", str(config), "--fix", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "5 bad lines (" in out and "3 have a safe repair" in out  # the repairs --fix then makes
    assert f"wrote {tmp_path / 'fixed' / 'train' / '0-train.jsonl'}: 1 lines kept, 3 repaired, 2 removed" in out
    fixed = [json.loads(line) for line in (tmp_path / "fixed" / "train" / "0-train.jsonl").read_text().splitlines()]
    assert fixed[0] == chat(0) and fixed[3] == chat(1)
    legacy = fixed[1]
    assert legacy["tools"] == [TOOL]
    call_id = legacy["messages"][1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()
    assert legacy["messages"][2] == {"role": "tool", "content": "a small feline", "tool_call_id": call_id}
    no_ids = fixed[2]
    call = no_ids["messages"][1]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"word": "dog"}'
    assert no_ids["messages"][2]["tool_call_id"] == call["id"]
    for sample in fixed:
        tokenize_sample(sample, tokenizers["v3"])
    assert (tmp_path / "fixed" / "eval" / "0-eval.jsonl").read_text() == eval_.read_text()

    fixed_config = tmp_path / "fixed" / "config.yaml"  # the same run, reading the repaired files
    written = yaml.safe_load(fixed_config.read_text())
    assert written["data"]["train"] == [{"path": str(tmp_path / "fixed" / "train" / "0-train.jsonl"), "weight": 1.0}]
    assert written["data"]["eval"] == [{"path": str(tmp_path / "fixed" / "eval" / "0-eval.jsonl"), "weight": 1.0}]
    assert written["seq_len"] == 64 and written["run_dir"] == str(tmp_path / "run")
    assert main(["validate", str(fixed_config)]) == 0
    assert "no faults" in capsys.readouterr().out

    written = {p: p.read_bytes() for p in (tmp_path / "fixed").rglob("*") if p.is_file()}
    assert main(["validate", str(config), "--fix", str(tmp_path / "fixed")]) == 2  # never written over
    fixed_dir = tmp_path / "fixed"
    assert (
        capsys.readouterr().err
        == f"error: --fix {fixed_dir} already exists and is not empty; choose a new output folder\n"
    )
    assert {p: p.read_bytes() for p in (tmp_path / "fixed").rglob("*") if p.is_file()} == written


def test_fix_lays_out_each_source_under_its_split_and_number(tmp_path, model_dirs, write_jsonl, chat, capsys):
    folder = tmp_path / "chats"
    write_jsonl(folder / "a.jsonl", [chat(0)])
    write_jsonl(folder / "deeper" / "b.jsonl", [chat(1), "{broken"])
    other = write_jsonl(tmp_path / "elsewhere" / "a.jsonl", [chat(2)])  # the same name as a file of the folder
    config = write_config(tmp_path, model_dirs["v3"], [folder, other], [other])
    assert main(["validate", str(config), "--fix", str(tmp_path / "out")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == [
        "config.yaml",
        "eval/0-a.jsonl",
        "train/0-chats/a.jsonl",
        "train/0-chats/deeper/b.jsonl",
        "train/1-a.jsonl",
    ]
    assert (tmp_path / "out" / "train" / "0-chats" / "deeper" / "b.jsonl").read_text() == json.dumps(chat(1)) + "\n"
    sources = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["data"]["train"]
    assert [s["path"] for s in sources] == [str(tmp_path / "out/train/0-chats"), str(tmp_path / "out/train/1-a.jsonl")]


def test_validate_config_and_model_errors(tmp_path, model_dirs, write_jsonl, chat, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(0)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [train])
    assert main(["validate", str(config), "seq_lenn=3"]) == 2
    assert "unknown key 'seq_lenn'; did you mean 'seq_len'?" in capsys.readouterr().err
    missing = tmp_path / "nope.jsonl"
    assert main(["validate", str(config), f"data.eval=[{train},{missing}]"]) == 2
    assert capsys.readouterr().err == f"error: data.eval[1]: {missing}: no such file or folder\n"
    assert main(["validate", str(config), f"model.path={tmp_path / 'nowhere'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: model.path: {tmp_path / 'nowhere'} is not a folder")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tekken.json").write_bytes((model_dirs["tekken"] / "tekken.json").read_bytes())
    (tmp_path / "model" / "params.json").write_text(json.dumps({"vocab_size": 32768}))
    config = write_config(tmp_path, tmp_path / "model", [train], [train])
    assert main(["validate", str(config)]) == 2  # the model folder is wrong, not the data
    assert "error: model.path: " in (err := capsys.readouterr().err) and "tekken.json has 131072 tokens but" in err


def test_tokenize_writes_tokens_and_weights_per_line(tmp_path, model_dirs, tokenizers, write_jsonl, chat, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(0), {"messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "tokens.jsonl"
    assert main(["tokenize", "--model", str(model_dirs["tekken"]), str(data), "-o", str(out)]) == 1
    assert capsys.readouterr().out == f'wrote {out}; 1 line(s) could not be tokenized: their records hold "error"\n'
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    expected = tokenize_sample(chat(0), tokenizers["tekken"])
    assert first == {"line": 1, "tokens": expected.tokens, "weights": expected.weights}
    assert second == {
        "line": 2,
        "error": "the last message (message 1) is from the user; a training sample ends with an assistant message",
    }


def test_tokenize_show_marks_the_trained_spans(tmp_path, model_dirs, write_jsonl, capsys):
    sample = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0.5},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"},
        ]
    }
    data = write_jsonl(tmp_path / "d.jsonl", [sample])
    assert main(["tokenize", "--model", str(model_dirs["tekken"]), str(data), "--show"]) == 0
    shown = capsys.readouterr().out
    assert "d.jsonl:1: 13 tokens, 5 trained" in shown
    assert "<s>[INST]Hi[/INST]«Hello</s>»(0.5)[INST]Bye[/INST]«Ciao</s>»" in shown


def test_python_dash_m_finetune_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "validate" in result.stdout and "tokenize" in result.stdout


def test_tokenize_into_a_pipe_closed_early_ends_quietly(tmp_path, model_dirs, write_jsonl, chat):
    """`tailor tokenize ... | head -1`: head closes the pipe after one line; tokenize stops without a word."""
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i, turns=3, words=40) for i in range(2000)])
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "tokenize", "--model", str(model_dirs["v3"]), str(data)],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    reader.stdin.close()
    reader.wait()
    assert (result.returncode, result.stderr) == (0, "")


def test_version():
    result = subprocess.run([sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert re.fullmatch(r"tailor \d+\.\d+\.\d+\S*\n", result.stdout)


def test_help_says_how_to_train():
    result = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "`python train.py CONFIG [KEY=VALUE ...]` on one device" in " ".join(result.stdout.split())


def test_validate_imports_no_checkpoint_machinery():
    """`tailor validate` is a short process a user runs often: what it imports (its command, the checks it shares with
    training's pre-flight, the ETA and the memory estimate) leaves out torch.distributed.checkpoint and the training
    state that needs it (a second of start-up on a busy 2-core machine)."""
    code = (
        "import sys, finetune.validate_command, finetune.planning.validate, finetune.training.preflight, "
        "finetune.planning.eta, "
        "finetune.planning.memory_estimate\n"
        "print(sorted(m for m in ('torch.distributed.checkpoint', 'finetune.training.checkpointing') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_validate_as_a_process_gives_its_exit_status_and_all_its_output(tmp_path, model_dirs, write_jsonl, chat):
    """The command line's process leaves without the collector's last walk (gc.freeze): nothing it wrote is lost."""
    train = write_jsonl(tmp_path / "train.jsonl", [chat(0), "{broken", chat(1)])
    config = write_config(tmp_path, model_dirs["tekken"], [train], [train])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "finetune", "validate", str(config), "--device", "cpu", "--gpu-memory", "80"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{train}:2: invalid JSON" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("memory: about ")  # the last line validate prints


def loads_torch(argv: list[str]) -> tuple[int, bool]:
    """`tailor ARGV` run in a fresh interpreter: its exit status, and whether it loaded torch."""
    code = (  # --version and --help leave through argparse's sys.exit
        "import sys\nfrom finetune.cli import main\n"
        f"try:\n    sys.exit(main({argv!r}))\nfinally:\n    print('torch' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    return result.returncode, result.stderr.splitlines()[-1] == "True"


def test_validate_and_version_load_no_torch(tmp_path, model_dirs, write_jsonl, chat):
    """`tailor validate` never builds a model: importing torch was over a second of its start-up (benchmarks/
    RESULTS.md). With --device and --gpu-memory nothing asks this machine's GPU, so on any machine no torch."""
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, model_dirs["tekken"], [train], [train])
    assert loads_torch(["validate", str(config), "--device", "h100", "--gpu-memory", "80"]) == (0, False)
    assert loads_torch(["--version"]) == (0, False)


@pytest.mark.skipif(
    any(os.path.exists(path) for path in GPU_DEVICE_FILES), reason="a GPU driver is here: torch is asked about it"
)
def test_validate_asks_torch_about_a_gpu_only_where_a_driver_is(tmp_path, model_dirs, write_jsonl, chat):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, model_dirs["v3"], [train], [train])
    assert loads_torch(["validate", str(config)]) == (0, False)
