"""`tailor chat`: talk to a base, merged or adapted model, or answer a file of conversations.

Prompts are mistral-common's `encode_chat_completion` of the conversation, the same template training uses;
replies come from model/generate.py (KV cache, batched) and end at EOS. With `--adapter`, the trained adapter
runs beside the frozen weights as in training, or folded into them with `--merge` (faster, same answers up to
rounding). An adapter trained with `model.quantize: nf4` runs on the NF4 base it was trained on (its params.json
says so), or as `--quantize` says.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.checkpoints.adapter import read_adapter, read_base_quantization
from finetune.data.errors import SampleFault, first_line
from finetune.data.jsonl import parse_line, read_lines
from finetune.data.model_tokenizer import check_tokenizer_vocab, find_tokenizer_file
from model.args import load_model_args
from model.generate import generate
from model.loading import load_model
from model.lora import load_lora_state_dict, merge_lora
from model.quantize import QUANTIZATIONS, QuantizationUnavailable
from model.transformer import Transformer
from model.weights import vision_tower_specs


@dataclass
class Sampling:
    """How replies are generated: `generate`'s length and sampling settings."""

    max_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = 0  # sampled answers are reproducible by default


def load_chat_model(
    model_dir: str | Path, adapter_dir: str | Path | None = None, merge: bool = False, quantize: str = "none"
) -> tuple[Transformer, MistralTokenizer]:
    """Load a model with its adapter, and its tokenizer, for generation.

    On the GPU in bf16 when there is one, else on the CPU in fp32.

    Args:
        adapter_dir: a checkpoint folder holding lora.safetensors.
        merge: fold the adapter into the weights (faster, same answers up to rounding).
        quantize: "nf4" stores the frozen projections in NF4.

    Raises:
        ValueError: `merge` on a quantized base, no model folder, an adapter that does not fit the model, or a
            model folder `load_model` refuses.
        FileNotFoundError: no tokenizer file, params.json / config.json or weights in the model folder.
        QuantizationUnavailable: NF4 asked for without torchao installed.
    """
    if merge and quantize != "none":
        raise ValueError(
            f"--merge on a {quantize} base would merge into its 4-bit weights: run `tailor merge` (into the original "
            "weights) and chat with the merged folder, or leave --merge out"
        )
    if not Path(model_dir).is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    tokenizer = MistralTokenizer.from_file(str(find_tokenizer_file(model_dir)))  # before minutes of loading
    check_tokenizer_vocab(tokenizer, load_model_args(model_dir).vocab_size, model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if adapter_dir is None:
        model = load_model(model_dir, dtype=dtype, device=device, quantize=quantize)
    else:
        state, lora = read_adapter(adapter_dir)
        model = load_model(model_dir, dtype=dtype, device=device, lora=lora, quantize=quantize)
        try:
            load_lora_state_dict(model, state)
        except ValueError as e:
            raise ValueError(f"{adapter_dir} does not fit {model_dir}: {e}") from None
        if merge:
            merge_lora(model)
    return model.eval(), tokenizer


def encode_conversation(
    tokenizer: MistralTokenizer, messages: list[dict], tools: list[dict] | None = None
) -> list[int]:
    """Prompt tokens of a conversation that ends with a user (or tool) message."""
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


def generate_replies(
    model: Transformer, tokenizer: MistralTokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8
) -> list[list[int]]:
    """Reply tokens (EOS not included) of each prompt, `batch_size` prompts per generation."""
    eos_id = tokenizer.instruct_tokenizer.tokenizer.eos_id
    replies = []
    for start in range(0, len(prompts), batch_size):
        replies += generate(
            model,
            prompts[start : start + batch_size],
            sampling.max_tokens,
            eos_id,
            sampling.temperature,
            sampling.top_p,
            sampling.seed,
        )
    return replies


def chat_once(model: Transformer, tokenizer: MistralTokenizer, messages: list[dict], sampling: Sampling) -> str:
    """The assistant's answer to a conversation."""
    return answer_conversations(model, tokenizer, [{"messages": messages}], sampling)[0]


def answer_conversations(
    model: Transformer, tokenizer: MistralTokenizer, conversations: list[dict], sampling: Sampling, batch_size: int = 8
) -> list[str]:
    """Answers to conversations given as `{"messages": [...], "tools": [...] (optional)}`."""
    prompts = [encode_conversation(tokenizer, c["messages"], c.get("tools")) for c in conversations]
    return [tokenizer.decode(reply) for reply in generate_replies(model, tokenizer, prompts, sampling, batch_size)]


def answer_file(
    model: Transformer,
    tokenizer: MistralTokenizer,
    input_path: str | Path,
    output_path: str | Path,
    sampling: Sampling,
    batch_size: int = 8,
) -> int:
    """Answer every conversation of a JSON Lines file, one `{"messages", "answer"}` line per input line.

    The input's final assistant message, if any, is left out of the prompt and kept as `"reference"`.

    Returns:
        The number of answers written.

    Raises:
        ValueError: naming FILE:LINE, a line that is not a conversation the tokenizer can encode.
    """
    conversations, prompts = [], []
    for number, conversation in read_conversations(input_path):
        try:
            prompts.append(encode_conversation(tokenizer, conversation["messages"], conversation.get("tools")))
        except Exception as e:  # mistral-common's validation errors have no common base class
            raise ValueError(
                f"{input_path}:{number}: the tokenizer cannot encode this conversation: {first_line(e)}"
            ) from None
        conversations.append(conversation)
    replies = generate_replies(model, tokenizer, prompts, sampling, batch_size)
    with open(output_path, "w", encoding="utf-8") as f:
        for conversation, reply in zip(conversations, replies):
            f.write(json.dumps({**conversation, "answer": tokenizer.decode(reply)}, ensure_ascii=False) + "\n")
    return len(replies)


def read_conversations(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, conversation) of each non-blank line; a final assistant message becomes `reference`.

    Raises:
        ValueError: naming FILE:LINE, a line that is not JSON or has no list of messages.
    """
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = parse_line(line)  # the training data's reader: any bytes give a value or a fault, never a crash
        except SampleFault as fault:
            raise ValueError(f"{path}:{number}: {fault.message}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{path}:{number}: expected an object with a non-empty 'messages' list of objects")
        conversation = {"messages": messages}
        if messages[-1].get("role") == "assistant":
            conversation = {"messages": messages[:-1], "reference": messages[-1].get("content")}
        if record.get("tools"):
            conversation["tools"] = record["tools"]
        yield number, conversation


# What a line starting with "/" does in the interactive chat; such a line is never sent to the model.
SLASH_COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation and start a new one",
    "/exit": "quit (also Ctrl-D, or Ctrl-C at the prompt)",
}


def interactive_chat(
    model: Transformer,
    tokenizer: MistralTokenizer,
    sampling: Sampling,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    """Hold a conversation on the terminal until the user quits.

    Each line is a user message, answered with the whole history in the prompt; a line starting with "/" is one of
    SLASH_COMMANDS. Ctrl-C while an answer is generated stops that answer (the question is forgotten, the
    conversation goes on); at the prompt it quits, as end of input does.
    """
    stdout.write("Type a message; /help lists the commands, Ctrl-C stops an answer.\n")
    history: list[dict] = []
    while True:
        try:  # the prompt is inside: a Ctrl-C just after it is written is still a Ctrl-C at the prompt
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return
        text = line.strip()
        if not line or text == "/exit":
            return
        if text == "/reset":
            history = []
            stdout.write("(new conversation)\n")
        elif text == "/help":
            stdout.write("".join(f"  {command:<7} {meaning}\n" for command, meaning in SLASH_COMMANDS.items()))
        elif text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; /help lists the commands\n")
        elif text:
            system_message = [{"role": "system", "content": system}] if system else []
            try:
                answer = chat_once(
                    model, tokenizer, system_message + history + [{"role": "user", "content": text}], sampling
                )
            except KeyboardInterrupt:
                stdout.write("\n(answer interrupted; the question is left out of the conversation)\n")
                continue
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            stdout.write(answer + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor chat`'s arguments to its parser."""
    parser.add_argument("model", type=Path, help="a base or merged model folder")
    parser.add_argument("--adapter", type=Path, help="checkpoint folder holding lora.safetensors")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the weights before generating")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="store the frozen weights in NF4 (default: as the adapter was trained, else none)",
    )
    parser.add_argument("--prompt", help="answer this one message and exit (default: an interactive loop)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--input", type=Path, help="JSON Lines of {'messages': [...]} conversations to answer")
    parser.add_argument("--output", type=Path, help="where --input's answers go (JSON Lines)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations generated together with --input")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling when temperature > 0")


def run(args: argparse.Namespace) -> int:
    """Run `tailor chat`: one prompt, a file of conversations, or an interactive loop; return the exit code.

    Raises:
        ValueError: options that do not go together, or a model, adapter or input file that cannot be used.
    """
    sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
    if (args.input is None) != (args.output is None):
        raise ValueError("--input and --output go together")
    if args.input is not None and args.prompt is not None:
        raise ValueError("--prompt and --input exclude each other")
    if args.merge and args.adapter is None:
        raise ValueError("--merge needs --adapter")
    quantize = args.quantize
    if quantize is None:
        quantize = read_base_quantization(args.adapter) if args.adapter is not None else "none"
        if quantize != "none":
            print(
                f"{args.adapter} was trained on a {quantize} base: the base is quantized the same way", file=sys.stderr
            )
    try:
        model, tokenizer = load_chat_model(args.model, args.adapter, args.merge, quantize)
    except QuantizationUnavailable as error:
        raise ValueError(f"--quantize {quantize}: {error}") from None
    if tower := vision_tower_specs(args.model):
        print(f"{args.model}: the vision tower ({len(tower)} tensors) is not loaded: text chat only", file=sys.stderr)
    if args.input is not None:
        count = answer_file(model, tokenizer, args.input, args.output, sampling, args.batch_size)
        print(f"{count} answers written to {args.output}")
    elif args.prompt is not None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        print(chat_once(model, tokenizer, system + [{"role": "user", "content": args.prompt}], sampling))
    else:
        interactive_chat(model, tokenizer, sampling, args.system)
    return 0
