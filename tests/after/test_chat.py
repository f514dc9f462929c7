import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from finetune.after.chat import (
    SLASH_COMMANDS,
    Sampling,
    answer_conversations,
    answer_file,
    chat_once,
    encode_conversation,
    generate_replies,
    interactive_chat,
    load_chat_model,
)
from finetune.cli import main

REPO = Path(__file__).resolve().parents[2]

GREEDY = Sampling(max_tokens=12)
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]},
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "Tell me a long story about a cat and a dog."},
        ]
    },
]


@pytest.fixture(scope="module")
def chat_model(adapter_checkpoint):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    return load_chat_model(base, checkpoint)


def full_forward_greedy(model, prompt: list[int], max_tokens: int, eos_id: int) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache."""
    tokens, reply = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor(tokens), [len(tokens)])[-1].argmax())
            if token == eos_id:
                break
            reply.append(token)
            tokens.append(token)
    return reply


def test_greedy_chat_is_deterministic_and_equals_a_full_forward_per_step(chat_model, adapter_checkpoint):
    model, tokenizer = chat_model
    messages = CONVERSATIONS[2]["messages"]
    prompt = encode_conversation(tokenizer, messages)
    assert prompt == tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    eos_id = tokenizer.instruct_tokenizer.tokenizer.eos_id
    expected = full_forward_greedy(model, prompt, GREEDY.max_tokens, eos_id)
    assert len(expected) > 0
    assert generate_replies(model, tokenizer, [prompt], GREEDY) == [expected]
    answer = chat_once(model, tokenizer, messages, GREEDY)
    assert answer == chat_once(model, tokenizer, messages, GREEDY) == tokenizer.decode(expected)

    base, checkpoint = adapter_checkpoint("mistral-7b")
    merged, _ = load_chat_model(base, checkpoint, merge=True)
    assert generate_replies(merged, tokenizer, [prompt], GREEDY) == [expected]
    plain, _ = load_chat_model(base)  # the adapter changes the answer
    assert generate_replies(plain, tokenizer, [prompt], GREEDY) != [expected]


def test_replies_stop_at_eos(adapter_checkpoint):
    base, _ = adapter_checkpoint("mistral-7b")
    model, tokenizer = load_chat_model(base)
    eos_id = tokenizer.instruct_tokenizer.tokenizer.eos_id
    prompt = encode_conversation(tokenizer, CONVERSATIONS[0]["messages"])
    fourth = full_forward_greedy(model, prompt, 4, eos_id)[3]
    with torch.no_grad():  # EOS now wins where the fourth token did (at the latest)
        model.output.weight[eos_id] = 1.01 * model.output.weight[fourth]
    expected = full_forward_greedy(model, prompt, GREEDY.max_tokens, eos_id)
    assert len(expected) < 4
    assert generate_replies(model, tokenizer, [prompt], GREEDY) == [expected]


def test_batched_answers_equal_one_by_one_answers(chat_model):
    model, tokenizer = chat_model
    one_by_one = [chat_once(model, tokenizer, c["messages"], GREEDY) for c in CONVERSATIONS]
    assert answer_conversations(model, tokenizer, CONVERSATIONS, GREEDY, batch_size=2) == one_by_one


def test_sampling_is_reproducible_with_a_seed(chat_model):
    model, tokenizer = chat_model
    sampling = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    messages = CONVERSATIONS[0]["messages"]
    assert chat_once(model, tokenizer, messages, sampling) == chat_once(model, tokenizer, messages, sampling)


def test_answer_file_keeps_the_reference_and_names_bad_lines(chat_model, tmp_path):
    model, tokenizer = chat_model
    source = tmp_path / "held_out.jsonl"
    with_reference = CONVERSATIONS[0]["messages"] + [{"role": "assistant", "content": "Paris"}]
    lines = [{"messages": with_reference}, CONVERSATIONS[1]]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    assert answer_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY, batch_size=2) == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["reference"] == "Paris" and out[0]["messages"] == CONVERSATIONS[0]["messages"]
    assert "reference" not in out[1]
    assert [o["answer"] for o in out] == answer_conversations(model, tokenizer, CONVERSATIONS[:2], GREEDY)

    source.write_text(json.dumps(lines[1]) + "\n" + '{"messages": []}\n')
    with pytest.raises(ValueError, match=f"{source}:2: expected an object with a non-empty 'messages' list"):
        answer_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY)
    source.write_text(
        json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"
    )
    with pytest.raises(ValueError, match=f"{source}:1: the tokenizer cannot encode this conversation"):
        answer_file(model, tokenizer, source, tmp_path / "out.jsonl", GREEDY)


def test_interactive_loop_keeps_history_until_reset(chat_model):
    model, tokenizer = chat_model
    stdout = io.StringIO()
    interactive_chat(
        model, tokenizer, GREEDY, system="Be brief.", stdin=io.StringIO("hello\n\nagain\n/reset\nhi\n"), stdout=stdout
    )
    system = [{"role": "system", "content": "Be brief."}]
    first = chat_once(model, tokenizer, system + [{"role": "user", "content": "hello"}], GREEDY)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = chat_once(model, tokenizer, system + history + [{"role": "user", "content": "again"}], GREEDY)
    after_reset = chat_once(model, tokenizer, system + [{"role": "user", "content": "hi"}], GREEDY)
    printed = stdout.getvalue()
    assert printed.index(first + "\n") < printed.index(second + "\n") < printed.index("(new conversation)")
    assert printed.rstrip("> ").endswith(after_reset + "\n")

    stdout = io.StringIO()
    interactive_chat(model, tokenizer, GREEDY, stdin=io.StringIO("/exit\nhello\n"), stdout=stdout)
    assert stdout.getvalue().count("> ") == 1  # stopped at /exit


def test_cli(adapter_checkpoint, chat_model, tmp_path, capsys):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    model, tokenizer = chat_model
    args = [str(base), "--adapter", str(checkpoint), "--prompt", "Hi", "--max-tokens", "12"]
    assert main(["chat", *args]) == 0
    assert capsys.readouterr().out == chat_once(model, tokenizer, [{"role": "user", "content": "Hi"}], GREEDY) + "\n"
    assert main(["chat", str(base), "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "error: --input and --output go together" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing"), "--prompt", "Hi"]) == 2
    assert "error: model folder not found" in capsys.readouterr().err


class Interrupted(io.StringIO):
    """A terminal where the user presses Ctrl-C at the prompt."""

    def readline(self, *args):
        raise KeyboardInterrupt


def test_slash_commands_are_listed_and_never_sent_to_the_model(chat_model, monkeypatch):
    sent = []
    monkeypatch.setattr("finetune.after.chat.chat_once", lambda model, tok, messages, sampling: sent.append(messages))
    stdout = io.StringIO()
    interactive_chat(*chat_model, GREEDY, stdin=io.StringIO("/help\n/model big\n/reset\n/exit\n"), stdout=stdout)
    assert sent == []
    printed = stdout.getvalue()
    for command, meaning in SLASH_COMMANDS.items():
        assert f"  {command:<7} {meaning}\n" in printed
    assert "unknown command /model; /help lists the commands\n" in printed


def test_ctrl_c_stops_the_answer_and_at_the_prompt_quits(chat_model, monkeypatch):
    asked = []

    def answer(model, tokenizer, messages, sampling):
        asked.append(messages)
        if len(asked) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer is generated
        return "an answer"

    monkeypatch.setattr("finetune.after.chat.chat_once", answer)
    stdout = io.StringIO()
    interactive_chat(*chat_model, GREEDY, stdin=io.StringIO("first\nsecond\nthird\n"), stdout=stdout)
    assert "(answer interrupted; the question is left out of the conversation)" in stdout.getvalue()
    assert asked[1] == [{"role": "user", "content": "second"}]  # the interrupted question is not in the history
    assert asked[2][:2] == [{"role": "user", "content": "second"}, {"role": "assistant", "content": "an answer"}]

    stdout = io.StringIO()
    interactive_chat(*chat_model, GREEDY, stdin=Interrupted(), stdout=stdout)  # returns: no traceback
    assert stdout.getvalue().endswith("> \n")


def test_ctrl_c_at_the_prompt_of_tailor_chat_exits_cleanly(adapter_checkpoint):
    base, _ = adapter_checkpoint("mistral-7b")
    chat = subprocess.Popen(
        [sys.executable, "-m", "finetune", "chat", str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    shown = b""
    while not shown.endswith(b"> "):  # the prompt: the model is loaded and waits for a line
        byte = chat.stdout.read(1)
        assert byte, chat.stderr.read().decode()
        shown += byte
    chat.send_signal(signal.SIGINT)
    out, err = chat.communicate(timeout=60)
    assert chat.returncode == 0, err.decode()
    assert b"Traceback" not in err and err.decode().strip() == ""
