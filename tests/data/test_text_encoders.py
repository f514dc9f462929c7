"""The fast text encoders give mistral-common's own tokens, on every bundled tokenizer, for ordinary and hostile text;
the word memo's file reads back what was written, is refused when it is not that, and is written only when the
memo learned words."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import mistral_common
import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data import load_tokenizer
from finetune.data.cache import open_tokenized_files
from finetune.data.text_encoders import WordMemoSentencePiece, fast_text_encoder, pack, word_memo_is_exact
from finetune.data.word_memo_file import read_words, write_words

BUNDLED_DIR = Path(mistral_common.__file__).parent / "data"
SENTENCEPIECE = [
    "tokenizer.model.v1",
    "mistral_instruct_tokenizer_240216.model.v2",
    "mistral_instruct_tokenizer_240323.model.v3",
    "mistral_instruct_tokenizer_241114.model.v7",
]
TEKKEN = ["tekken_240718.json", "tekken_240911.json"]

# Each one a way splitting at spaces could go wrong: space runs, spaces beside other whitespace (unicode's too),
# leading and trailing spaces, combining marks after a space, '▁' (SentencePiece's space), control tokens' text.
HOSTILE = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "x",
    " x",
    "x ",
    " x ",
    "a  b",
    "a   b",
    "a \tb",
    "a\t b",
    "a \nb",
    "a\n b",
    "a\u00a0b",
    "a \u00a0 b",
    "\u00a0 a",
    "a \u00a0",
    "\u3000",
    "a\u3000b",
    "a \u3000 b",
    "a\u2028b",
    "a \u2028 b",
    "a\u0085b",
    "a \u0085 b",
    "a\u2029 b",
    "\x1c a \x1f",
    "a \u200b b",
    "e\u0301 e\u0301",
    " \u0301",
    "a \u0301b",
    "😀 😀😀",
    "👩‍👩‍👧 🏳️‍🌈",
    "▁",
    "a ▁b",
    "▁ a",
    "▁▁a",
    "a▁ b",
    "[INST] hi [/INST]",
    "</s> <s>",
    "[TOOL_CALLS] x",
    "x" * 5000,
    "x" * 5000 + " " + "y" * 3000,
    "word\r\nnext",
    "Hello  world  ",
    "中文 字符 😀 1 22 .,!",
    "1 2 3 4",
]
ALPHABET = list("ab c  \n\t.,!é中😀1 2") + ["  ", "\n ", " \n", "\u00a0", "\u3000", "\u2028", "\u0085", "\u0301", "▁"]
WORDS = ["a", "the", "é", "中文", "😀", "1", "22", "\n", "\t", ".", ",!", "ab\nc", "[INST]", "e\u0301", "x" * 3000]


def hostile_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = HOSTILE + ["".join(rng.choices("qzxjk", k=20_000))]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    texts += [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(1500)]  # single spaces only
    return texts


@pytest.fixture(scope="module")
def raw_tokenizers() -> dict:
    """mistral-common's raw tokenizer (what the chat templates call `encode` on) of each bundled file."""
    return {
        name: MistralTokenizer.from_file(str(BUNDLED_DIR / name)).instruct_tokenizer.tokenizer
        for name in [*SENTENCEPIECE, *TEKKEN]
    }


@pytest.mark.parametrize("name", SENTENCEPIECE + TEKKEN)
def test_fast_text_encoder_equals_encode(raw_tokenizers, name):
    raw = raw_tokenizers[name]
    fast = fast_text_encoder(raw)
    assert isinstance(fast, WordMemoSentencePiece) == (name in SENTENCEPIECE)  # the memo is exact for each of them
    if name in SENTENCEPIECE:
        assert word_memo_is_exact(raw)
    texts = hostile_texts(0)
    for text in texts + texts:  # twice: the second pass reads the memo
        assert fast(text) == raw.encode(text, bos=False, eos=False), repr(text)


@pytest.mark.parametrize("name", SENTENCEPIECE)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("max_words", [WordMemoSentencePiece.max_words, 300])
def test_word_memo_prepared_in_batches_equals_encode(raw_tokenizers, name, threads, max_words):
    """`prepare` encodes the new words of a batch of texts at once, in `threads` threads; the ids handed out after
    it are the original's, for the texts prepared and for others, and once the memo is full (max_words 300)."""
    raw = raw_tokenizers[name]
    fast = fast_text_encoder(raw, threads)
    fast.max_words = max_words
    texts = hostile_texts(1)
    for batch in (texts[:2000], texts[1000:]):  # overlapping batches: known and new words, repeated texts
        fast.prepare(batch)
        for text in batch[::-1] + texts[:50]:  # in another order, with texts of an earlier batch
            ids = fast(text)
            assert ids == raw.encode(text, bos=False, eos=False), repr(text)
            ids.append(-1)  # a caller may extend what it is given: no later answer changes
    assert len(fast.words()) == max_words if max_words == 300 else len(fast.words()) > 1000


@pytest.mark.parametrize("name", TEKKEN)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tekken_prepared_in_threads_equals_encode(raw_tokenizers, name, threads):
    """Tekken's `prepare` encodes a batch's texts ahead, a share per thread; what `__call__` hands out after it is the
    original's, for texts prepared (in any order, repeated) and not, and for batches of no text or one."""
    raw = raw_tokenizers[name]
    fast = fast_text_encoder(raw, threads)
    texts = hostile_texts(1)
    for batch in (texts[:2000], texts[1000:], [], texts[:1], texts[:7] * 2):
        fast.prepare(batch)
        for text in batch[::-1] + texts[:50]:
            assert fast(text) == raw.encode(text, bos=False, eos=False), repr(text)


def test_tekken_prepare_encodes_on_every_thread_it_is_given(raw_tokenizers):
    """The shares of a batch run on `threads` threads at once (tiktoken's BPE leaves Python's lock), and the texts
    prepared are then answered without encoding again."""
    fast = fast_text_encoder(raw_tokenizers["tekken_240911.json"], 2)
    encode, threads_seen, calls = fast._encode, set(), []

    def counted(text):
        threads_seen.add(threading.get_ident())
        calls.append(text)
        return encode(text)

    fast._encode = counted
    texts = [f"text number {k} " * 50 for k in range(200)]
    fast.prepare(texts)
    assert len(threads_seen) == 2 and len(calls) == 200
    assert [fast(text) for text in texts] == [encode(text) for text in texts] and len(calls) == 200


def test_prepared_texts_are_answered_from_the_memo_alone(raw_tokenizers):
    """After `prepare`, the texts it was told of cost SentencePiece no call, however their words repeat; a text
    it was not told of still gets its words encoded."""
    raw = raw_tokenizers["mistral_instruct_tokenizer_240323.model.v3"]
    memo = fast_text_encoder(raw)
    calls = []
    processor = memo._processor
    memo._processor = type(
        "Counting",
        (),
        {
            "encode": lambda _, x, **kw: calls.append(x) or processor.encode(x, **kw),
            "__getattr__": lambda _, name: getattr(processor, name),  # the rest is SentencePiece's own
        },
    )()
    rng = random.Random(3)
    texts = [" ".join(rng.choices(WORDS[:-1], k=rng.randint(1, 30))) for _ in range(500)]
    memo.prepare(texts)
    assert len(calls) == 1 and sorted(calls[0]) == sorted({w for t in texts for w in t.split(" ")})
    assert [memo(t) for t in texts] == [raw.encode(t, bos=False, eos=False) for t in texts]
    assert len(calls) == 1
    assert [memo.packed(t) for t in texts] == [pack(raw.encode(t, bos=False, eos=False)) for t in texts]
    assert len(calls) == 1
    assert memo("unprepared words") == raw.encode("unprepared words", bos=False, eos=False) and len(calls) == 2


def test_word_memo_is_bounded(raw_tokenizers):
    """Once full, the memo learns nothing more; where the bound cuts a batch, it keeps the words met first."""
    processor = raw_tokenizers["mistral_instruct_tokenizer_240323.model.v3"]._model
    memo = WordMemoSentencePiece(processor)
    memo.max_words = 10
    for i in range(50):
        memo(f"word{i} other{i}")
    assert len(memo.words()) <= 12
    memo = WordMemoSentencePiece(processor)
    memo.max_words = 10
    memo.prepare([f"word{i} other{i}" for i in range(50)])
    assert list(memo.words()) == ["word0", "other0", "word1", "other1", "word2", "other2", "word3", "other3", "word4"][
        :10
    ] + ["other4"]
    memo.prepare(["more words here"])
    assert len(memo.words()) == 10
    assert memo("more words here") == processor.encode("more words here")


# ---------------------------------------------------------------------------------------------------
# The memo file


def test_memo_file_reads_back_what_was_written(tmp_path):
    words = {"the": [1], " lead": [2, 3], "trail  ": [4], "中文": [5, 6, 7], "e\u0301": [8], "😀": [9, 10, 11, 12]}
    words |= {"\u00a0\u3000\u2028\u0085": [13], "[INST]": [14, 15], "x" * 5000: list(range(16, 30))}
    words = {word: pack(ids) for word, ids in words.items()}
    write_words(tmp_path / "m.npz", words)
    read = read_words(tmp_path / "m.npz", 30)
    assert read == words and list(read) == list(words)
    write_words(tmp_path / "empty.npz", {})
    assert read_words(tmp_path / "empty.npz", 30) == {}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "id outside the vocabulary",
        "negative id",
        "ends past the text",
        "ends short of the text",
        "empty word",
        "not UTF-8",
        "float ids",
        "an object array",
        "an array missing",
    ],
)
def test_a_memo_file_that_is_not_one_is_refused(tmp_path, damage):
    path = tmp_path / "m.npz"
    write_words(path, {"ab": pack([1, 2]), "中": pack([3]), "c": pack([4])})
    arrays = _arrays(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        if damage == "id outside the vocabulary":
            arrays["ids"][0] = 5
        elif damage == "negative id":
            arrays["ids"][0] = -1
        elif damage == "ends past the text":
            arrays["text_ends"][-1] += 1
        elif damage == "ends short of the text":
            arrays["text_ends"][-1] -= 1
        elif damage == "empty word":
            arrays["text_ends"][1] = arrays["text_ends"][0]
        elif damage == "not UTF-8":
            arrays["text"][2] = 0xFF
        elif damage == "float ids":
            arrays["ids"] = arrays["ids"].astype(np.float32)
        elif damage == "an object array":
            arrays["ids"] = np.array([[1, 2], [3], [4]], dtype=object)
        else:
            del arrays["id_ends"]
        np.savez(path, **arrays)
    assert read_words(path, 5) is None


def test_the_memo_file_is_written_only_when_the_memo_learned_words(tmp_path, model_dirs, write_jsonl, chat):
    """A build whose words the memo file holds all of leaves the file as it was; one with new words rewrites it
    with them."""
    first = write_jsonl(tmp_path / "a.jsonl", [chat(i, turns=2) for i in range(30)])
    same_words = write_jsonl(tmp_path / "b.jsonl", [chat(i, turns=2) for i in range(29, -1, -1)])
    new_words = write_jsonl(tmp_path / "c.jsonl", [{"text": "unheard-of zyxwvut"}])
    open_tokenized_files([first], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=0)
    (memo_file,) = (tmp_path / "cache" / "word_memo").iterdir()
    written = memo_file.stat().st_ino, read_words(memo_file, 32768)
    open_tokenized_files([same_words], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=0)
    assert (memo_file.stat().st_ino, read_words(memo_file, 32768)) == written
    open_tokenized_files([new_words], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=0)
    after = read_words(memo_file, 32768)
    assert memo_file.stat().st_ino != written[0] and set(after) - set(written[1]) == {"unheard-of", "zyxwvut"}


def test_memo_files_of_an_older_layout_are_removed_with_a_word(tmp_path, model_dirs, write_jsonl, chat, capsys):
    """Memo files of an older layout (no layout in their name) are never read again: writing a memo removes them and
    says so; the memo files of other tokenizers, and files being written, stay."""
    folder = tmp_path / "cache" / "word_memo"
    folder.mkdir(parents=True)
    older = folder / "0123456789abcdef0123456789abcdef.npz"
    write_words(older, {"the": pack([1])})
    being_written = folder / ".v2-0123456789abcdef0123456789abcdef.npz.tmp-99"  # finetune/atomic_files.py's naming
    being_written.write_bytes(b"half")
    data = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(5)])
    open_tokenized_files([data], load_tokenizer(model_dirs["v3"]), "all", tmp_path / "cache", num_workers=0)
    (v3_memo,) = folder.glob("v2-*.npz")
    assert not older.exists() and being_written.exists()
    assert f"{folder}: removed 1 word memo file(s) of an older layout" in capsys.readouterr().out
    other = write_jsonl(tmp_path / "b.jsonl", [chat(i + 100) for i in range(5)])
    open_tokenized_files([other], load_tokenizer(model_dirs["v1"]), "all", tmp_path / "cache", num_workers=0)
    assert v3_memo.exists() and len(list(folder.glob("v2-*.npz"))) == 2
    assert "removed" not in capsys.readouterr().out
