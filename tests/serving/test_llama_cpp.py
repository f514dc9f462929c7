"""llama.cpp (through llama-cpp-python) runs `tailor export-gguf`'s files: its greedy tokens equal tailor's, and its
own tokenizer makes of the chat template's text the prompt mistral-common makes.

llama-cpp-python builds llama.cpp from source (over 10 CPU-minutes), longer than CI's time: CI reads the files back
with gguf's reader instead (tests/after/test_export_gguf.py); this runs where a wheel of it is installed
(tests/serving/setup_env.sh with LLAMA_CPP_WHEEL=...). The weights are rounded to f16 before tailor generates
(`tailor export-hf --dtype float16`), so both compute from the very same numbers.
"""

import pytest
from conftest import CONVERSATION, MAX_TOKENS, tailor

llama_cpp = pytest.importorskip("llama_cpp")


def llama_cpp_replies(model_path, prompts: list[list[int]]) -> list[list[int]]:
    llm = llama_cpp.Llama(str(model_path), n_ctx=512, n_threads=1, verbose=False, logits_all=False)
    replies = []
    for prompt in prompts:
        llm.reset()
        reply = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token == llm.token_eos() or len(reply) == MAX_TOKENS:
                break
            reply.append(token)
        replies.append(reply)
    return replies, llm


@pytest.mark.parametrize("arch, tokenizer", [("mistral-7b", "v3"), ("mixtral-8x7b", "tekken")])
def test_llama_cpp_answers_with_tailors_tokens(arch, tokenizer, trained, tailor_replies, tmp_path):
    root = trained(arch, tokenizer)
    f16 = tmp_path / "merged-f16"
    tailor("export-hf", "--model", root / "merged", "--out", f16, "--dtype", "float16")
    gguf_file = tmp_path / "model.gguf"
    tailor("export-gguf", "--model", f16, "--out", gguf_file, "--type", "f16")
    conversations = [CONVERSATION, [{"role": "user", "content": "Hello"}]]
    prompts, expected = tailor_replies(f16, None, conversations)

    replies, llm = llama_cpp_replies(gguf_file, prompts)
    assert replies == expected and sum(map(len, expected)) > MAX_TOKENS  # replies, not just an EOS

    # The chat template in the file, rendered by llama-cpp-python and tokenized by llama.cpp: tailor's prompt.
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
    rendered = formatter(messages=CONVERSATION).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompts[0]
