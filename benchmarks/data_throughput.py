"""Tokens per second of the data path, on generated multi-turn chat of realistic lengths.

    python benchmarks/data_throughput.py [--samples 12000] [--runs 3] [--workers 0 2] [--processes]
                                         [--tokenizers Tekken "SentencePiece v3"]

For SentencePiece v3 and Tekken (or those --tokenizers names) it measures, on the same generated file, in
alternating runs (each path once per round, round after round, so a shared machine's changing load falls on all of
them alike; every other round in reverse order, so that no path always runs right after the same one and inherits
its caches or its worker pool's teardown), and prints the median of each with the spread (min-max) and its speed
against each of the two references (ratios below the list):
1. two references, both mistral-finetune's work restated here with mistral-common's objects (mistral-finetune is
   archived and not installed; its finetune/data/dataset.py and tokenize.py were read for this):
   - "build_dataset": what its `build_dataset` does for one epoch of a training run with its default data settings
     (`instruct.shuffle` and `instruct.dynamic_chunk_fn_call` on): every line is parsed and built into a sample once
     to look for tool-call conversations to chunk (`maybe_chunk_lines`; none here), then parsed, built (pydantic
     messages, a finetuning validator per sample, a `TrainingInstructSample` request) and tokenized with a boolean
     mask (`tokenize_instruct`), the samples shuffled, and packed into seq_len sequences of input, target and mask
     lists (`sequence_iterator`): the goal of issue 17 is stated against this;
   - "per-sample work": the same parsing, validation and tokenizing with nothing else (no second build, no request
     object, no shuffle, no packing): a stricter floor, kept so that every ratio can be read against both;
2. tailor: tokenize + mask + cache + pack: `open_sources` into a cache with no entry for the file, then packing
   every sample once into seq_len sequences; with 0 workers (in-process) and with 2, each with a cold word memo (an
   empty cache folder, as a first run) and with a warm one (the memo that earlier builds left in the cache folder);
3. cache reads: TrainLoader batches read back from the cache built in 2.

Each path's speed is given against build_dataset, then against per-sample work ("A / B"), two ways:
- "medians": the reference's median wall / the path's median wall, over all rounds;
- "per round": the reference's wall / the path's wall within each round (runs next to each other in time, so under
  nearly the same load), the median of those over the rounds, with their min-max. On a shared machine whose speed
  changes from one second to the next this paired ratio is the steadier one; its min-max says how far one round
  strays. The default --runs 3 is quick; on a shared machine use --runs 7 or more.

With --processes it times whole processes instead (in the same alternating rounds, with the same ratios), the way
a user meets them, fresh interpreters (imports, tokenizer loading and start-up included): `python -m finetune
validate CONFIG` (tailor validate, an empty cache folder each run, as a first run) against `python
benchmarks/data_throughput.py --reference-process KIND FILE MODEL SEQ_LEN`, the "build_dataset" reference in a
process that imports what mistral-finetune's finetune/data/dataset.py imports (numpy, torch.distributed,
mistral-common), and the "per-sample work" in one that imports only mistral-common.

The text is made of words drawn from a Zipf law, as natural language is: real English words first, then a
long tail of English-looking made-up words, so that neither tokenizer (nor tailor's word memo) sees an
unrealistically small or unrealistically short set of words.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mistral_common
import numpy as np
from mistral_common.protocol.instruct.messages import FinetuningAssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.protocol.instruct.validator import MistralRequestValidatorV3, ValidationMode

# tailor's modules are imported where they are used: the --reference-process mode imports only what its reference
# does, so that its start-up is the reference's own.
REPO = Path(__file__).resolve().parents[1]

TOKENIZERS = {"SentencePiece v3": "mistral_instruct_tokenizer_240323.model.v3", "Tekken": "tekken_240911.json"}


# ---------------------------------------------------------------------------------------------------
# Data


def make_vocabulary(rng: random.Random, size: int = 80_000) -> tuple[list[str], list[float]]:
    """English words by frequency, then English-looking made-up words, with Zipf weights.

    The frequent words are the real ones of Python's own documentation (pydoc_data); the long tail is made
    by a letter-trigram model of those words, so rare words have the length and letters of English ones.
    """
    from pydoc_data.topics import topics as pydoc_topics

    corpus = re.findall(r"[a-z]+", " ".join(pydoc_topics.values()).lower())
    real = [w for w, _ in Counter(corpus).most_common() if len(w) > 1 or w in "ai"]
    following: dict[str, list[str]] = {}
    for word in real:
        padded = "^^" + word + "$"
        for k in range(len(padded) - 2):
            following.setdefault(padded[k : k + 2], []).append(padded[k + 2])
    words, seen = list(real), set(real)
    while len(words) < size:
        made = "^^"
        while not made.endswith("$") and len(made) < 16:
            made += rng.choice(following[made[-2:]])
        made = made.strip("^$")
        if len(made) > 2 and made not in seen:
            seen.add(made)
            words.append(made)
    return words, list(np.cumsum([1 / (rank + 2.7) ** 1.07 for rank in range(size)]))


def make_text(rng: random.Random, vocab: tuple[list[str], list[float]], n_words: int) -> str:
    words, cumulative = vocab
    picked = rng.choices(words, cum_weights=cumulative, k=n_words)
    out, sentence = [], 0
    for w in picked:
        sentence += 1
        if sentence == 1:
            w = w.capitalize()
        if rng.random() < 0.02:
            w = str(rng.randint(0, 10_000))
        out.append(w)
        if sentence > 6 and rng.random() < 0.12:
            out[-1] += rng.choice(".....?!:")
            sentence = 0
            if rng.random() < 0.15:
                out[-1] += "\n\n"
        elif rng.random() < 0.06:
            out[-1] += ","
    text = " ".join(out).replace("\n\n ", "\n\n")
    return text + "."


def make_chat_file(path: Path, n_samples: int, seed: int = 0) -> None:
    """Multi-turn chats: 1 to 6 turns, users of 10 to 250 words, answers of 40 to 500, half with a system prompt."""
    rng = random.Random(seed)
    vocab = make_vocabulary(rng)
    with open(path, "w") as f:
        for _ in range(n_samples):
            messages = []
            if rng.random() < 0.5:
                messages.append({"role": "system", "content": make_text(rng, vocab, rng.randint(10, 80))})
            for _ in range(rng.randint(1, 6)):
                messages.append({"role": "user", "content": make_text(rng, vocab, rng.randint(10, 250))})
                messages.append({"role": "assistant", "content": make_text(rng, vocab, rng.randint(40, 500))})
            f.write(json.dumps({"messages": messages}) + "\n")


# ---------------------------------------------------------------------------------------------------
# Measurements


class Stopwatch:
    """The wall time of what runs inside it."""

    def __enter__(self) -> Stopwatch:
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall


def reference_path(path: Path, tokenizer) -> tuple[Stopwatch, int]:
    """mistral-finetune's per-sample work (finetune/data/tokenize.py there), one process, nothing else: its messages,
    one finetuning validator for the file, its tokenize_instruct."""
    instruct = tokenizer.instruct_tokenizer
    validator = MistralRequestValidatorV3(ValidationMode.finetuning)
    n_tokens = 0
    with Stopwatch() as watch, open(path) as f:
        for line in f:
            system_prompt, messages = messages_as_mistral_finetune(json.loads(line))
            validator.validate_messages(messages)
            tokens, _ = tokenize_as_mistral_finetune(messages, system_prompt, False, instruct)
            n_tokens += len(tokens)
    return watch, n_tokens


class TrainingSample(InstructRequest):
    """mistral-finetune's TrainingInstructSample: mistral-common's instruct request, with its `only_last` flag."""

    only_last: bool = False


def messages_as_mistral_finetune(data: dict) -> tuple[str | None, list]:
    """Its build_instruct_sample's messages of a chat without tools, as mistral-common's pydantic objects, and the
    system prompt its system message becomes."""
    system_prompt, messages = data.get("system_prompt"), []
    for m in data["messages"]:
        content = m.get("content", m.get("text"))
        if m["role"] == "system":
            system_prompt = content
        elif m["role"] == "user":
            messages.append(UserMessage(content=content))
        else:
            messages.append(FinetuningAssistantMessage(content=content, tool_calls=None, weight=m.get("weight")))
    return system_prompt, messages


def build_sample_as_mistral_finetune(data: dict) -> TrainingSample:
    """Its build_instruct_sample for chats without tools: the messages, a finetuning validator made for this sample,
    and the request object (pydantic validates the messages once more)."""
    system_prompt, messages = messages_as_mistral_finetune(data)
    validator = MistralRequestValidatorV3(ValidationMode.finetuning)
    validator.validate_messages(messages)
    validator._validate_tools([])
    only_last = data.get("only_last", False)
    return TrainingSample(messages=messages, system_prompt=system_prompt, available_tools=None, only_last=only_last)


def tokenize_as_mistral_finetune(
    messages: list, system_prompt: str | None, only_last: bool, instruct
) -> tuple[list[int], list[bool]]:
    """Its tokenize_instruct: the stock per-message encoders, a mask that is True on the trained assistant messages."""
    tokens, mask = instruct.start(), [False]
    users = [i for i, m in enumerate(messages) if isinstance(m, UserMessage)]
    for i, m in enumerate(messages):
        if isinstance(m, UserMessage):
            new = instruct.encode_user_message(m, None, i == users[-1], i == users[0], system_prompt)[0]
            trained = False
        else:
            # mistral-finetune also passes continue_message=False, an argument mistral-common 1.13 no longer has
            new = instruct.encode_assistant_message(m, is_before_last_user_message=False)
            trained = m.weight in (None, 1) and (not only_last or i == len(messages) - 1)
        tokens += new
        mask += [trained] * len(new)
    return tokens, mask


def pack_as_mistral_finetune(samples: list[tuple[list[int], list[bool]]], seq_len: int) -> int:
    """Its sequence_iterator for one epoch: inputs, targets and mask appended to seq_len-long lists, pieces with no
    trained target skipped, full sequences kept when they train something; returns how many it made."""
    n_sequences = 0
    inputs, targets, mask, sizes = [], [], [], []
    for tokens, sample_mask in samples:
        assert len(inputs) < seq_len
        x, y, m = tokens[:-1], tokens[1:], sample_mask[1:]
        begin = 0
        while begin < len(x):
            end = begin + seq_len - len(inputs)
            piece_mask = m[begin:end]
            if any(piece_mask):
                inputs += x[begin:end]
                targets += y[begin:end]
                mask += piece_mask
                sizes.append(len(piece_mask))
                if len(inputs) == seq_len:
                    assert len(targets) == len(mask) == sum(sizes) == seq_len
                    n_sequences += any(mask)
                    inputs, targets, mask, sizes = [], [], [], []
            begin += len(piece_mask)
    return n_sequences


def build_dataset_path(path: Path, tokenizer, seq_len: int) -> tuple[Stopwatch, int]:
    """mistral-finetune's build_dataset for one training epoch of one file, with its default data settings."""
    instruct = tokenizer.instruct_tokenizer
    with Stopwatch() as watch:
        with open(path) as f:
            lines = list(f)
        for line in lines:  # dynamic_chunk_fn_call: each sample is built once to look for tool calls to chunk
            sample = build_sample_as_mistral_finetune(json.loads(line))
            assert not sample.only_last  # only such conversations are chunked; these chats have none
        samples = []
        for line in lines:
            sample = build_sample_as_mistral_finetune(json.loads(line))
            samples.append(
                tokenize_as_mistral_finetune(sample.messages, sample.system_prompt, sample.only_last, instruct)
            )
        np.random.RandomState(seed=np.array((0, 0))).shuffle(samples)
        pack_as_mistral_finetune(samples, seq_len)
    return watch, sum(len(tokens) for tokens, _ in samples)


def tailor_path(
    path: Path, tokenizer, cache_dir: Path, workers: int, seq_len: int, warm_memo: bool
) -> tuple[Stopwatch, float]:
    """Tokenize + mask + cache + pack every sample once, from a cache with no entry for the file (and with the word
    memo of earlier builds when `warm_memo`); returns the time and the padding share."""
    from finetune.data import load_tokenizer
    from finetune.data.config import DataSource
    from finetune.data.packing import DocumentFeed, make_batch, pack_sequence
    from finetune.data.sources import open_sources

    for entry in cache_dir.glob("*") if cache_dir.exists() else []:
        if entry.name != "word_memo" or not warm_memo:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    tokenizer = load_tokenizer(tokenizer)  # a new process's tokenizer: its in-memory memo starts empty
    with Stopwatch() as watch:
        # its "tokenizing ..." line, printed once per run, would bury the results
        with contextlib.redirect_stdout(io.StringIO()):
            (source,) = open_sources([DataSource(str(path))], tokenizer, "all", cache_dir, workers)
        feed = DocumentFeed(lambda epoch: np.arange(len(source)) if epoch == 0 else None)
        counts, n_sequences = Counter(), 0
        while pieces := pack_sequence(feed, source, seq_len, "split", counts):
            make_batch([(source, pieces)], seq_len)
            n_sequences += 1
    padding = 1 - (int(source.lengths.sum()) - len(source)) / (n_sequences * seq_len)
    return watch, padding


def cache_read_tokens_per_second(
    path: Path, tokenizer, cache_dir: Path, seq_len: int, batch_size: int, n_batches: int
) -> float:
    from finetune.data import build_train_loader
    from finetune.data.config import DataConfig, DataSource
    from finetune.data.sources import open_run_data

    data = open_run_data(DataConfig(train=[DataSource(str(path))], num_workers=0), tokenizer, cache_dir=cache_dir)
    loader = build_train_loader(data, seq_len=seq_len, batch_size=batch_size, rank=0, world_size=1, seed=0)
    next(loader)  # first epoch's permutation
    start = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    return n_batches * batch_size * seq_len / (time.perf_counter() - start)


def make_model_folder(folder: Path, tokenizer_file: str) -> Path:
    """A model folder as `tailor validate` reads it: the bundled tokenizer and a params.json of its vocabulary."""
    folder.mkdir()
    name = tokenizer_file.replace("mistral_instruct_tokenizer_240323.", "tokenizer.")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / tokenizer_file, folder / name)
    vocab = 131072 if name.startswith("tekken") else 32768
    params = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2}
    params |= {"norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 1e6}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


REFERENCES = ("mistral-finetune's build_dataset", "mistral-finetune's per-sample work")


def alternating_rounds(run, labels: list[str], rounds: int) -> dict[str, list[float]]:
    """`run(label)` for every label once per round, every other round in reverse order (so that no path always runs
    right after the same one: its caches, its worker pool's teardown); returns each label's walls, round by round."""
    walls = {label: [] for label in labels}
    for round_index in range(rounds):
        for label in labels[::-1] if round_index % 2 else labels:
            walls[label].append(run(label))
    return walls


def paired_ratios(walls: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float, float]]:
    """Each path's reference wall / its wall within each round, whose runs were next to each other in time (so under
    nearly the same load): the median over the rounds, the min and the max."""
    paired = {}
    for label, times in walls.items():
        ratios = [reference_wall / wall for reference_wall, wall in zip(walls[reference], times, strict=True)]
        paired[label] = (statistics.median(ratios), min(ratios), max(ratios))
    return paired


def in_process(args, tmp: Path, data: Path) -> None:
    from finetune.data import load_tokenizer

    for name in args.tokenizers:
        model = make_model_folder(tmp / name.replace(" ", "_"), TOKENIZERS[name])
        tokenizer = load_tokenizer(model)
        paths = {
            REFERENCES[0]: lambda tokenizer=tokenizer: build_dataset_path(data, tokenizer, args.seq_len),
            REFERENCES[1]: lambda tokenizer=tokenizer: reference_path(data, tokenizer),
            **{
                f"tailor, {workers} workers, {memo} word memo": (
                    lambda workers=workers, memo=memo, model=model: tailor_path(
                        data, model, tmp / f"cache-{workers}-{memo}", workers, args.seq_len, memo == "warm"
                    )
                )
                for workers in args.workers
                for memo in ("cold", "warm")
            },
        }
        results = {}  # the references' token counts, tailor's padding shares: the same in every round

        def run(label: str, paths=paths, results=results) -> float:
            watch, results[label] = paths[label]()
            return watch.wall

        for label in paths:  # a first build leaves the warm memo's words; nothing of it is timed
            run(label)
        walls = alternating_rounds(run, list(paths), args.runs)
        n, padding = results[REFERENCES[0]], results[list(paths)[-1]]
        reads = cache_read_tokens_per_second(
            data, tokenizer, tmp / f"cache-{args.workers[-1]}-warm", args.seq_len, args.batch_size, 200
        )
        print(f"{name}: {n / 1e6:.2f}M tokens; load average {os.getloadavg()[0]:.1f} at the end")
        print_medians(walls, lambda wall, n=n: n / wall / 1e6, "M tok/s")
        print(
            f"  padding at seq_len {args.seq_len}: {padding:.1%}; cache reads, TrainLoader batches of "
            f"{args.batch_size} x {args.seq_len}: {reads / 1e6:.1f}M tok/s"
        )


def print_medians(walls: dict[str, list[float]], value, unit: str) -> None:
    """Each path's median over its alternating runs as `value(wall seconds)` in `unit`, with the spread of the runs,
    and its speed against each reference's (the first two paths): the ratio of the medians, and the paired ratios of
    the rounds (median, min-max)."""
    references = list(walls)[:2]
    reference_medians = [statistics.median(walls[reference]) for reference in references]
    paired = [paired_ratios(walls, reference) for reference in references]
    width = max(map(len, walls))
    for label, times in walls.items():
        median = statistics.median(times)
        low, high = sorted((value(min(times)), value(max(times))))
        ratios = " / ".join(f"{reference / median:.2f}x" for reference in reference_medians)
        per_round = " / ".join(f"{p[label][0]:.2f}x ({p[label][1]:.2f}-{p[label][2]:.2f})" for p in paired)
        print(
            f"  {label:<{width}} {value(median):6.2f}{unit} (median; runs {low:.2f} to {high:.2f}), "
            f"medians {ratios}, per round {per_round}"
        )
    print(
        f"  (ratios: against {' / against '.join(references)}; medians: the reference's median wall / the path's; "
        f"per round: the median over the {len(walls[references[0]])} rounds of the reference's wall / the path's wall "
        "in the same round, with their min-max)"
    )


def whole_processes(args, tmp: Path, data: Path) -> None:
    """Fresh interpreters, alternating: the reference processes against `tailor validate` with an empty cache."""
    import yaml

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in args.tokenizers:
        model = make_model_folder(tmp / name.replace(" ", "_"), TOKENIZERS[name])
        commands = {
            f"{reference}, a process of its own": [
                sys.executable,
                __file__,
                "--reference-process",
                kind,
                data,
                model,
                args.seq_len,
            ]
            for reference, kind in zip(REFERENCES, ("build_dataset", "per-sample"))
        }
        caches = {}
        for workers in args.workers:
            config = tmp / f"{model.name}-{workers}.yaml"
            caches[workers] = tmp / f"validate-cache-{model.name}-{workers}"
            settings = {"run_dir": str(tmp / "run"), "model": {"path": str(model)}, "seq_len": args.seq_len}
            settings |= {"max_steps": 10, "batch_size": 1, "eval": {"enabled": False}}
            settings["data"] = {"train": [str(data)], "cache_dir": str(caches[workers]), "num_workers": workers}
            config.write_text(yaml.safe_dump(settings))
            commands[f"tailor validate, {workers} workers, empty cache"] = [
                sys.executable, "-m", "finetune", "validate", str(config)
            ]  # fmt: skip

        def run(label: str, commands=commands, caches=caches) -> float:
            for cache in caches.values():
                shutil.rmtree(cache, ignore_errors=True)
            command = list(map(str, commands[label]))
            start = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
            return wall

        for label in commands:  # a first round warms the file system's page cache; not counted
            run(label)
        walls = alternating_rounds(run, list(commands), args.runs)
        print(f"{name}: whole processes, load average {os.getloadavg()[0]:.1f} at the end")
        print_medians(walls, lambda wall: wall, " s")


def reference_process(kind: str, data: Path, model: Path, seq_len: int) -> None:
    """A reference in a process of its own: what it imports, mistral-common's tokenizer from the model folder, then
    its work. mistral-finetune's finetune/data/dataset.py imports numpy and torch.distributed before anything else."""
    if kind == "build_dataset":
        import torch.distributed  # noqa: F401
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    (tokenizer_file,) = [p for p in model.iterdir() if p.name != "params.json"]
    tokenizer = MistralTokenizer.from_file(str(tokenizer_file), mode=ValidationMode.finetuning)
    if kind == "build_dataset":
        watch, n = build_dataset_path(data, tokenizer, seq_len)
    else:
        watch, n = reference_path(data, tokenizer)
    print(f"{n} tokens in {watch.wall:.2f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--runs", type=int, default=3, help="alternating rounds (7 or more on a shared machine); medians and spread"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values to time")
    parser.add_argument("--data", type=Path, help="a .jsonl file to read (generated there, of --samples, if missing)")
    parser.add_argument("--processes", action="store_true", help="time whole processes: tailor validate")
    parser.add_argument(
        "--tokenizers", nargs="+", choices=list(TOKENIZERS), default=list(TOKENIZERS), help="the tokenizers to time"
    )
    parser.add_argument(
        "--reference-process", nargs=4, metavar=("KIND", "FILE", "MODEL", "SEQ_LEN"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.reference_process:
        kind, data, model, seq_len = args.reference_process
        return reference_process(kind, Path(data), Path(model), int(seq_len))
    sys.path.insert(0, str(REPO))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or tmp / "chat.jsonl"
        if not data.exists():  # a --data file that does not exist yet is generated there and kept
            make_chat_file(data, args.samples)
        print(
            f"data: {data.stat().st_size / 2**20:.1f} MiB of chats; {os.cpu_count()} cores; seq_len {args.seq_len}; "
            f"{args.runs} alternating runs; load average {os.getloadavg()[0]:.1f} at the start"
        )
        (whole_processes if args.processes else in_process)(args, tmp, data)


if __name__ == "__main__":
    main()
