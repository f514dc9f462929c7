import json
import math

import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from finetune.after.extend_vocab import extend_vocab
from finetune.cli import main
from model.loading import load_model


@pytest.mark.parametrize("arch", ["mistral-7b-v0.1", "mixtral-8x7b"])
def test_extended_model_reads_v3_tokens_as_the_old_model_read_v1_tokens(arch, tiny_folder, tmp_path):
    old_folder = tiny_folder(arch, tokenizer="v1")
    new_folder = extend_vocab(old_folder, tmp_path / "extended")
    assert sorted(p.name for p in new_folder.iterdir()) == [
        "consolidated.safetensors",
        "params.json",
        "tokenizer.model.v3",
    ]
    assert json.loads((new_folder / "params.json").read_text())["vocab_size"] == 32768

    text = "Hello world, ça va? 12345 \u4e2d\u6587"
    v1 = MistralTokenizer.from_file(str(old_folder / "tokenizer.model.v1")).instruct_tokenizer.tokenizer
    v3 = MistralTokenizer.from_file(str(new_folder / "tokenizer.model.v3")).instruct_tokenizer.tokenizer
    old_tokens, new_tokens = v1.encode(text, bos=True, eos=False), v3.encode(text, bos=True, eos=False)
    assert new_tokens == [t + 768 if t >= 3 else t for t in old_tokens]

    old, new = load_model(old_folder, dtype=torch.float32), load_model(new_folder, dtype=torch.float32)
    with torch.no_grad():
        old_logits = old(torch.tensor(old_tokens), [len(old_tokens)])
        new_logits = new(torch.tensor(new_tokens), [len(new_tokens)])
    torch.testing.assert_close(new_logits[:, :3], old_logits[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_logits[:, 771:], old_logits[:, 3:], rtol=1e-5, atol=1e-5)

    added = load_file(new_folder / "consolidated.safetensors")["tok_embeddings.weight"][3:771]
    assert abs(added.std().item() - 1 / math.sqrt(new.args.dim)) < 0.01


def test_extend_vocab_refuses_other_vocabularies(tiny_folder, tmp_path, capsys):
    v3_model = tiny_folder("mistral-7b", tokenizer="v3")
    assert main(["extend-vocab", "--model", str(v3_model), "--out", str(tmp_path / "x")]) == 2
    assert f"error: {v3_model}: vocab_size is 32768 (already extended)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vocab_size is 131072;"):
        extend_vocab(tiny_folder("nemo-12b", tokenizer="tekken"), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
