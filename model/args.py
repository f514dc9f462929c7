"""Model hyper-parameters, read from a model folder's `params.json` (native) or `config.json` (Hugging Face)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

# Keys that real Mistral params.json files (and our own checkpoints) carry but that do not change the text
# decoder: tolerated and dropped. Anything else unknown is an error, so a typo never passes silently.
IGNORED_KEYS = frozenset(
    {"lora", "max_seq_len", "max_batch_size", "max_position_embeddings", "model_type", "vision_encoder", "_version"}
)

# Each size's ceiling, far above every Mistral model's (Large: dim 12288, 88 layers, hidden 28672, 131k vocab): a
# params.json beyond one is refused before a model is built from it (a million layers, or dim 2^62).
MAX_SIZES = {
    "dim": 1 << 16,
    "n_layers": 1 << 10,
    "head_dim": 1 << 12,
    "hidden_dim": 1 << 18,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "vocab_size": 1 << 22,
    "sliding_window": 1 << 24,
    "num_experts": 1 << 10,
    "num_experts_per_tok": 1 << 10,
}
MAX_EXPERT_BLOCKS = 1 << 15  # n_layers x num_experts: each expert is three modules, even on the meta device


@dataclass
class MoeArgs:
    """A Mixtral layer's mixture of experts: how many experts, and how many each token is routed to."""

    num_experts: int
    num_experts_per_tok: int


@dataclass
class ModelArgs:
    """A Mistral or Mixtral text decoder's shape, as its params.json names the keys; checked as it is built.

    Raises:
        ValueError: a number that is not finite and > 0, a size above MAX_SIZES, n_heads not a multiple of
            n_kv_heads, an odd head_dim, or num_experts_per_tok outside [1, num_experts].
    """

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
                raise ValueError(f"key '{f.name}' must be a finite number > 0, got {value}")
        sizes = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.moe is not None:
            sizes.update({f"moe.{k}": v for k, v in asdict(self.moe).items()})
        for key, value in sizes.items():
            ceiling = MAX_SIZES.get(key.removeprefix("moe."))
            if ceiling is not None and isinstance(value, int) and value > ceiling:
                raise ValueError(f"key '{key}' is {value}, above {ceiling}, which no model tailor trains reaches")
        if self.moe is not None and self.n_layers * self.moe.num_experts > MAX_EXPERT_BLOCKS:
            raise ValueError(
                f"keys 'n_layers' {self.n_layers} and 'moe.num_experts' {self.moe.num_experts} make "
                f"{self.n_layers * self.moe.num_experts} expert blocks, above {MAX_EXPERT_BLOCKS}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ValueError(f"moe.num_experts_per_tok must be in [1, num_experts], got {self.moe}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "params.json") -> ModelArgs:
        """Parse a params.json's object strictly; keys in IGNORED_KEYS are dropped.

        Raises:
            ValueError: naming `source` and the key: a missing required key, an unknown key, a value of the wrong
                type, or one ModelArgs refuses.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        values = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    raise ValueError(f"{source}: missing required key '{f.name}'")
                continue
            value = d[f.name]
            if f.name == "moe" and value is not None:
                value = _parse_moe(value, source)
            elif value is not None or f.default is not None:  # null only where the field's default is null
                value = _check_number(value, float if f.name in ("norm_eps", "rope_theta") else int, source, f.name)
            values[f.name] = value
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The params.json content: optional fields are written only when set, as in Mistral's files."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in ("sliding_window", "moe") and v is None)}


def _check_number(value, kind: type, source: str, key: str):
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool):
        raise ValueError(f"{source}: key '{key}' must be {kind.__name__}, got {value!r}")
    return kind(value)


def _parse_moe(value, source: str) -> MoeArgs:
    keys = {f.name for f in fields(MoeArgs)}
    if not isinstance(value, dict) or set(value) != keys:
        raise ValueError(f"{source}: key 'moe' must be an object with exactly the keys {sorted(keys)}, got {value!r}")
    return MoeArgs(**{k: _check_number(value[k], int, source, f"moe.{k}") for k in sorted(keys)})


MODEL_CONFIG_FILES = ("params.json", "config.json")  # Mistral's format first, then Hugging Face's


def read_model_config(folder: str | Path) -> tuple[Path, dict]:
    """The model folder's params.json, or its Hugging Face config.json when it has no params.json, read once.

    Returns:
        The file and the JSON object it holds, for `args_from_config`, `vocab_size_in` and the length check.

    Raises:
        FileNotFoundError: the folder has neither file.
        ValueError: the file is not a JSON object (read_json_object), naming it.
    """
    folder = Path(folder)
    for name in MODEL_CONFIG_FILES:
        if (path := folder / name).is_file():
            return path, read_json_object(path)
    raise FileNotFoundError(f"{folder}: no params.json or config.json; is this a model folder?")


def args_from_config(path: Path, values: dict) -> ModelArgs:
    """The ModelArgs of a params.json's or config.json's `values` (read_model_config), strictly checked.

    Raises:
        ValueError: naming `path` and the key (ModelArgs.from_dict, hf_config_to_args).
    """
    if path.name == "params.json":
        return ModelArgs.from_dict(values, source=str(path))
    return hf_config_to_args(values, source=str(path))


def load_model_args(folder: str | Path) -> ModelArgs:
    """Read params.json, or a Hugging Face config.json when the folder has no params.json.

    Raises:
        FileNotFoundError: the folder has neither file.
        ValueError: the file is not a JSON object, or not a model tailor reads, naming it and the key.
    """
    return args_from_config(*read_model_config(folder))


def vocab_size_in(path: Path, values: dict) -> int:
    """The vocabulary size a params.json or config.json (read_model_config) declares.

    A multimodal config's is its text model's, where it nests one.

    Raises:
        ValueError: naming `path`: the vocabulary size is not a positive integer.
    """
    text = values.get("text_config", values)
    if not isinstance(text, dict):
        raise ValueError(f"{path}: expected a JSON object of keys in text_config")
    vocab_size = text.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{path}: vocab_size must be a positive integer, got {vocab_size!r}")
    return vocab_size


def read_vocab_size(folder: str | Path) -> int:
    """vocab_size from params.json (Mistral format) or config.json (Hugging Face format).

    Raises:
        FileNotFoundError: the folder has neither file.
        ValueError: the file is not a JSON object, or its vocab_size is not a positive integer, naming it.
    """
    return vocab_size_in(*read_model_config(folder))


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (params.json, config.json); a leading byte-order mark is fine.

    Raises:
        ValueError: naming the file (and line where known): not UTF-8, not JSON, too deep or long to read, or not an
            object.
    """
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        where = f"byte 0x{e.object[e.start]:02x} at {e.start}"
        raise ValueError(f"{path}: not valid JSON: not UTF-8 text ({where})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    except (RecursionError, ValueError):  # nested past Python's limit, a number of more than 4300 digits
        raise ValueError(f"{path}: not valid JSON that can be read (nested too deeply, or a number too long)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object of keys, got {type(value).__name__}")
    return value


def args_to_hf_config(args: ModelArgs) -> dict:
    """A config.json that transformers' MistralForCausalLM / MixtralForCausalLM load as the same model."""
    cfg = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "sliding_window": args.sliding_window,  # explicit null: MistralConfig's default is 4096
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if args.moe:
        cfg["num_local_experts"] = args.moe.num_experts
        cfg["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return cfg


def hf_config_to_args(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Read a Mistral / Mixtral config.json (transformers 4 or 5 style); other architectures are refused.

    Raises:
        ValueError: naming `source`: another model_type, scaled rotary embeddings, tied embeddings, a missing or
            wrong key.
    """
    model_type = cfg.get("model_type")
    if model_type not in ("mistral", "mixtral"):
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected 'mistral' or 'mixtral')")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: scaled rotary embeddings are not supported")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tied input/output embeddings are not supported")
    for key in ("hidden_size", "num_attention_heads"):  # head_dim may be their quotient
        value = cfg.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: key '{key}' must be a positive integer, got {value!r}")
    try:
        d = {
            "dim": cfg["hidden_size"],
            "n_layers": cfg["num_hidden_layers"],
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            "hidden_dim": cfg["intermediate_size"],
            "n_heads": cfg["num_attention_heads"],
            "n_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            "norm_eps": cfg["rms_norm_eps"],
            "vocab_size": cfg["vocab_size"],
            # transformers' defaults when a file leaves the key out
            "rope_theta": cfg.get("rope_theta", rope.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4)),
            "sliding_window": cfg.get("sliding_window"),
        }
        if model_type == "mixtral":
            d["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e}") from None
    return ModelArgs.from_dict(d, source=source)


def write_params(folder: str | Path, params: dict) -> None:
    """A model folder's params.json, as everything here writes it: indented, ending in a newline."""
    (Path(folder) / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def num_parameters(args: ModelArgs) -> int:
    """Total parameter count (every expert of a MoE counted), without LoRA."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.hidden_dim
    if args.moe is not None:
        ffn = ffn * args.moe.num_experts + args.dim * args.moe.num_experts  # experts + router
    per_layer = attention + ffn + 2 * args.dim  # two RMSNorm weights
    return args.n_layers * per_layer + 2 * args.vocab_size * args.dim + args.dim


def active_parameters(args: ModelArgs) -> int:
    """The weights each token is multiplied by, 2 FLOPs each in forward.

    Those are attention, the feed-forward of the experts it is routed to (and the router), and the output head; not
    the embedding, which is a lookup.
    """
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.hidden_dim
    if args.moe is not None:
        ffn = ffn * args.moe.num_experts_per_tok + args.dim * args.moe.num_experts
    return args.n_layers * (attention + ffn) + args.vocab_size * args.dim


_MISTRAL_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5)
_NEMO = dict(dim=5120, n_layers=40, head_dim=128, n_heads=32, n_kv_heads=8, norm_eps=1e-5, vocab_size=131072)
_LARGE_22B = dict(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8, norm_eps=1e-5)

# The real sizes, as in each model's params.json; used for benchmarks and time/memory estimates.
ARCHITECTURES: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=10000.0, sliding_window=4096),
    "mistral-7b": ModelArgs(**_MISTRAL_7B, vocab_size=32768, rope_theta=1e6),
    "nemo-12b": ModelArgs(**_NEMO, hidden_dim=14336, rope_theta=1e6),
    "small-24b": ModelArgs(**_NEMO, hidden_dim=32768, rope_theta=1e8),
    "codestral-22b": ModelArgs(**_LARGE_22B, vocab_size=32768, rope_theta=1e6),
    "mixtral-8x7b": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=1e6, moe=MoeArgs(8, 2)),
    "mixtral-8x22b": ModelArgs(**_LARGE_22B, vocab_size=32768, rope_theta=1e6, moe=MoeArgs(8, 2)),
}
