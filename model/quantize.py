"""QLoRA's 4-bit frozen weights: every attention and feed-forward projection in NF4, torchao's NF4Tensor.

NF4 (4-bit NormalFloat, Dettmers et al. 2023) stores each block of 64 weights as 4-bit indices into 16 levels
spaced as the quantiles of a normal distribution, times the block's absmax; the absmax scales are themselves
quantized to 8 bits in groups of 256 (double quantization). That is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits a weight.

The quantized weight stays an `nn.Parameter` under its native name (`layers.0.attention.wq.weight`), so loading,
sharding and adapter keys are unchanged; `F.linear(x, weight)` on an NF4Tensor goes to torchao's `linear_nf4`,
which dequantizes the weight to x's dtype for that one matmul (forward and backward) and keeps nothing.
Embeddings, norms, the MoE router and the output head stay in the compute dtype: they are small, or (the head, the
router) their errors go straight to the logits.

torchao is an optional extra (`pip install -e ".[qlora]"`), imported only when a model is quantized.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
from torch import nn

from model.settings import INSTALL_HINT, NF4_BLOCK, NF4_SCALER_BLOCK

QUANTIZATIONS = ("none", "nf4")
QUANTIZED_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class QuantizationUnavailable(ImportError):
    """NF4 was asked for and torchao is not installed."""


@cache
def _torchao_nf4():
    """torchao's NF4Tensor and to_nf4 (torchao.quantization since 0.14, torchao.dtypes.nf4tensor before)."""
    # torchao's import logs a warning per optional kernel library it cannot load and per enum it registers with
    # torch.compile's pytree (none of them concern NF4): not for the user's screen
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
        except ImportError:
            raise QuantizationUnavailable(f"NF4 needs torchao: {INSTALL_HINT}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return NF4Tensor, to_nf4


def is_quantized_name(name: str) -> bool:
    """Whether a native weight name is one that `model.quantize: nf4` stores in NF4."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in QUANTIZED_LINEARS


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (or a DTensor's local shard) is torchao's NF4Tensor."""
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard
    return type(local).__name__ == "NF4Tensor"


def to_nf4(tensor: torch.Tensor) -> torch.Tensor:
    """Quantize `tensor` (2-D, in the compute dtype, on its device) to NF4 with QLoRA's block sizes.

    Raises:
        QuantizationUnavailable: torchao is not installed.
    """
    return _torchao_nf4()[1](tensor.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)


def nf4_rows(tensor: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Return part `index` of `parts` of an NF4 tensor's rows, holding its own bytes only.

    torch.chunk's parts are views that keep the whole weight's codes and scales alive (a rank of N held all N
    parts), and torchao's clone of such a view dequantizes to other values (0.18), so the part is rebuilt from
    copies of its inner tensors.
    """
    rows = torch.chunk(tensor, parts, dim=0)[index]
    names, context = rows.__tensor_flatten__()
    inner = {name: getattr(rows, name).clone() for name in names}
    return type(rows).__tensor_unflatten__(inner, context, rows.size(), rows.stride())


def nf4_shard_problem(name: str, shape: tuple[int, ...], world_size: int) -> str | None:
    """Say why a weight cannot be stored in NF4 split row-wise over `world_size` ranks; None when it can.

    Each rank's rows must hold whole groups of double-quantized scales (64 · 256 weights), as every Mistral model's
    do up to 256 ranks.
    """
    rows, cols = shape
    group = NF4_BLOCK * NF4_SCALER_BLOCK
    if rows % world_size or (rows // world_size) * cols % group:
        return (
            f"{name} {list(shape)} split over {world_size} rank(s) gives {rows * cols / world_size:g} weights a rank, "
            f"not a multiple of {group} (NF4 blocks of {NF4_BLOCK} weights, scales in groups of {NF4_SCALER_BLOCK})"
        )
    return None


def quantize_frozen_linears(model: nn.Module) -> list[str]:
    """Replace every frozen projection weight (QUANTIZED_LINEARS) of `model` by its NF4 version, in place.

    On the meta device this costs nothing and only sets the parameters' type: the values are assigned later, one
    tensor at a time (`assign_nf4`).

    Returns:
        The names of the weights replaced.

    Raises:
        QuantizationUnavailable: torchao is not installed.
    """
    names = [name for name, _ in model.named_parameters() if is_quantized_name(name)]
    for name in names:
        assign_nf4(model, name, to_nf4(model.get_parameter(name).detach()))
    return names


def assign_nf4(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make parameter `name` the NF4 tensor (or DTensor of NF4 shards) `value`, frozen.

    Assigned rather than copied into: an NF4Tensor's copy_ would quantize again, and FSDP2 picks up an assigned
    shard at its first forward.
    """
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
