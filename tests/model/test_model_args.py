import json

import pytest

from model.args import (
    ARCHITECTURES,
    ModelArgs,
    MoeArgs,
    active_parameters,
    args_to_hf_config,
    hf_config_to_args,
    load_model_args,
    num_parameters,
)

MISTRAL_7B_V01 = {  # the params.json shipped with Mistral 7B v0.1
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-05,
    "sliding_window": 4096,
    "vocab_size": 32000,
}


def test_real_params_json_parses_with_defaults():
    args = ModelArgs.from_dict(MISTRAL_7B_V01)
    assert args == ARCHITECTURES["mistral-7b-v0.1"]
    assert args.rope_theta == 10000.0 and args.moe is None


def test_moe_and_tolerated_keys():
    d = {
        **MISTRAL_7B_V01,
        "moe": {"num_experts": 8, "num_experts_per_tok": 2},
        "max_seq_len": 32768,
        "lora": {"rank": 16},
        "_version": "0.0.1",
        "vision_encoder": {"hidden_size": 1024},
    }
    assert ModelArgs.from_dict(d).moe == MoeArgs(8, 2)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"n_headz": 32}, "unknown key(s) ['n_headz']"),
        ({"dim": None}, "missing required key 'dim'"),
        ({"dim": "4096"}, "'dim' must be int"),
        ({"moe": {"num_experts": 8}}, "'moe' must be an object"),
        ({"n_kv_heads": 7}, "multiple of n_kv_heads"),
    ],
)
def test_bad_params_name_file_and_key(change, words):
    d = {**MISTRAL_7B_V01, **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError) as err:
        ModelArgs.from_dict(d, source="/models/x/params.json")
    assert "/models/x/params.json" in str(err.value) and words in str(err.value)


def test_to_dict_round_trip_and_load_from_folder(tmp_path):
    for args in ARCHITECTURES.values():
        (tmp_path / "params.json").write_text(json.dumps(args.to_dict()))
        assert load_model_args(tmp_path) == args
    assert "sliding_window" not in ARCHITECTURES["mistral-7b"].to_dict()  # as in Mistral's own files


def test_hf_config_round_trip(tmp_path):
    for args in ARCHITECTURES.values():
        assert hf_config_to_args(args_to_hf_config(args)) == args
    (tmp_path / "config.json").write_text(json.dumps(args_to_hf_config(ARCHITECTURES["mixtral-8x7b"])))
    assert load_model_args(tmp_path) == ARCHITECTURES["mixtral-8x7b"]
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        hf_config_to_args({"model_type": "llama"})


def test_num_parameters_match_published_sizes():
    assert num_parameters(ARCHITECTURES["mistral-7b-v0.1"]) == 7_241_732_096
    assert num_parameters(ARCHITECTURES["mixtral-8x7b"]) == 46_702_792_704
    assert round(num_parameters(ARCHITECTURES["nemo-12b"]) / 1e9, 1) == 12.2
    assert round(num_parameters(ARCHITECTURES["small-24b"]) / 1e9, 1) == 23.6
    assert round(num_parameters(ARCHITECTURES["codestral-22b"]) / 1e9, 1) == 22.2


def test_active_parameters_leave_out_the_embedding_norms_and_unused_experts():
    dense = ARCHITECTURES["mistral-7b"]
    lookups = dense.vocab_size * dense.dim + (2 * dense.n_layers + 1) * dense.dim  # embedding and RMSNorm weights
    assert active_parameters(dense) == num_parameters(dense) - lookups == 7_113_539_584
    mixtral = ARCHITECTURES["mixtral-8x7b"]  # "12.9B active parameters" counts the embedding too
    assert round((active_parameters(mixtral) + mixtral.vocab_size * mixtral.dim) / 1e9, 1) == 12.9
    assert round(num_parameters(ARCHITECTURES["mixtral-8x22b"]) / 1e9, 1) == 140.6
