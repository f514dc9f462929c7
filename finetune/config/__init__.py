"""The training configuration: one YAML file into nested dataclasses, strictly.

Every key is checked against the dataclasses (schema.py): an unknown key is an error with a "did you mean", a wrong
type or an impossible value is an error naming the key, all before any heavy work starts (building.py, checks.py).
Command-line overrides use dotted keys (`optim.lr=3e-5 max_steps=50`; loading.py). mistral-finetune's keys
(example/7B.yaml) are translated first, so its users' configs run unchanged (mistral_finetune.py).
"""

from finetune.config.building import config_from_dict
from finetune.config.loading import config_to_dict, load_config, load_yaml, read_yaml_mapping, save_config
from finetune.config.mistral_finetune import translate_mistral_finetune_keys
from finetune.config.schema import DEFAULT_CHUNK_SIZE, ConfigError, ModelConfig, OptimConfig, TrainConfig
from finetune.data.config import DataSource

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ConfigError",
    "DataSource",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_yaml",
    "read_yaml_mapping",
    "save_config",
    "translate_mistral_finetune_keys",
]
