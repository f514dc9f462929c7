"""Build the model for training: model/loading.py's builder, with NF4's checks, parallelism
(finetune/training/parallel.py) and the sharded placing of the weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.config import ConfigError, TrainConfig
from finetune.training.distributed import DistInfo
from finetune.training.loss import CausalLMWithLoss
from finetune.training.parallel import (
    apply_parallelism,
    broadcast_from_rank0,
    init_dora_magnitudes,
    init_lora_shards,
    place_shard,
)
from finetune.training.precision import compute_dtype
from model.args import ModelArgs
from model.loading import build_meta_model, fill_weights
from model.quantize import QuantizationUnavailable, is_quantized_name, nf4_shard_problem, quantize_frozen_linears
from model.transformer import Transformer
from model.weights import read_weights, vision_tower_specs, weight_specs


def quantize_meta_model(model: Transformer, world_size: int) -> None:
    """Apply model.quantize: nf4 to the meta model: the frozen projections become NF4 parameters (no memory).

    They are filled as the weights stream in. Each rank's rows of a weight must hold whole NF4 scale groups.

    Raises:
        ConfigError: a weight's rows cannot be split over `world_size` ranks in whole scale groups, or torchao is not
            installed.
    """
    for name, param in model.named_parameters():
        if is_quantized_name(name) and (problem := nf4_shard_problem(name, tuple(param.shape), world_size)):
            raise ConfigError(f"model.quantize: nf4 cannot store {problem}")
    try:
        quantize_frozen_linears(model)
    except QuantizationUnavailable as error:
        raise ConfigError(f"model.quantize: {error}") from None


def build_meta_training_model(
    cfg: TrainConfig, args: ModelArgs, dtype: torch.dtype, world_size: int, mesh=None
) -> CausalLMWithLoss:
    """The model of `args` as a run builds it, on the meta device, wrapped with its loss.

    LoRA and NF4 as configured, sharded over `world_size` ranks with the checkpointing and compilation cfg.model asks
    for. The trace (finetune/training/trace.py) builds the same.

    Args:
        dtype: the compute dtype (precision.compute_dtype).
        mesh: FSDP2's device mesh, where it is not the accelerator's (the trace's, on the CPU).

    Raises:
        ConfigError: model.quantize: nf4 cannot store this model on `world_size` ranks (quantize_meta_model).
    """
    model = build_meta_model(args, dtype, cfg.model.attention, cfg.lora)
    if cfg.model.quantize == "nf4":
        quantize_meta_model(model, world_size)
    loss_model = CausalLMWithLoss(model)
    apply_parallelism(loss_model, model.layers, cfg.model, world_size, dtype, mesh)
    return loss_model


def build_training_model(cfg: TrainConfig, args: ModelArgs, dist_info: DistInfo) -> CausalLMWithLoss:
    """The LoRA model of `args` wrapped with its loss, sharded when there is more than one process, weights loaded.

    Rank 0 reads the weights and the other ranks get each tensor from it; the adapters are initialised from cfg.seed.

    Args:
        args: the model folder's, as preflight read them.

    Raises:
        ConfigError: model.quantize: nf4 cannot store this model on these ranks.
        ValueError: the weight files do not match the model `args` describes, naming the folder and tensor.
    """
    model_dir = Path(cfg.model.path)
    dtype = compute_dtype(cfg.model.dtype, dist_info.device)
    loss_model = build_meta_training_model(cfg, args, dtype, dist_info.world_size)
    model = loss_model.model
    loss_model.to_empty(device=dist_info.device)
    weights = None
    if dist_info.rank == 0:  # the one reader: the other ranks get each tensor from it
        if tower := vision_tower_specs(model_dir):
            print(f"{model_dir}: the vision tower ({len(tower)} tensors) is not loaded: LoRA trains the text decoder")
        specs = weight_specs(model_dir)
        size = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())
        print(f"loading {model_dir}: {len(specs)} tensors, {size / 2**30:.2f} GiB", flush=True)
        # a bar on a terminal only (disable=None): a log gets the line above
        weights = tqdm(read_weights(model_dir), total=len(specs), desc="loading weights", unit="tensor", disable=None)
    fill_weights(model, broadcast_from_rank0(model, weights), model_dir, place=place_shard)
    init_lora_shards(model, cfg.seed)
    init_dora_magnitudes(model)  # from the loaded weights
    return loss_model
