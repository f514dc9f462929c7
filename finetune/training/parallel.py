"""Parallelism applied to an unchanged model, in one place.

The model is built on the meta device (no memory), LoRA is injected, then `apply_parallelism` gives every block
activation checkpointing, compilation and FSDP2 `fully_shard` as the config asks, and only then is memory
allocated, shard by shard. Rank 0 streams
the checkpoint one tensor at a time and scatters each to the ranks' shards, so N ranks on a node never
hold N copies of the model in CPU memory, and rank 0 holds one tensor at a time. With `model.quantize: nf4`,
each frozen projection is quantized as it arrives, on the device (model/quantize.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.dtensor import is_dtensor
from model.lora import LoRALinear, init_lora_, init_magnitude_
from model.quantize import assign_nf4, is_nf4, nf4_rows, to_nf4

if TYPE_CHECKING:
    from finetune.config import ModelConfig
    from model.args import ModelArgs


def apply_parallelism(
    root: nn.Module, blocks: nn.ModuleList, settings: ModelConfig, world_size: int, dtype: torch.dtype
) -> None:
    """Everything that changes how the (meta-device) model runs, in the order it must happen: activation
    checkpointing inside each block, each block compiled with its checkpointing, then FSDP2 over the blocks and
    `root` when there is more than one rank, computing in `dtype`. Names and numbers stay those of the unchanged
    model."""
    if settings.activation_checkpointing:
        for block in blocks:
            enable_activation_checkpointing(block if settings.checkpointing_scope == "block" else block.feed_forward)
    if settings.compile:
        for block in blocks:
            block.compile()
    if world_size > 1:
        shard_model(root, blocks, compute_dtype=dtype, prefetch=settings.fsdp_prefetch)


def compile_note(settings: ModelConfig, args: ModelArgs) -> str | None:
    """What `model.compile` cannot do for this model, said before step 1: in a Mixtral block under activation
    checkpointing, dynamo stops at the experts' token counts (read on the host), and a checkpointed region with a graph
    break runs eagerly whole."""
    if settings.compile and args.moe and settings.activation_checkpointing:
        return (
            "compile: model.compile: true compiles nothing here: Mixtral's expert dispatch reads its token counts on "
            "the host, which stops torch.compile inside a checkpointed block, so the blocks run eagerly "
            "(model.activation_checkpointing: false compiles the parts around it, at the activations' memory)"
        )
    return None


def enable_activation_checkpointing(block: nn.Module) -> None:
    """Recompute the block's activations in backward instead of storing them.

    The forward is wrapped in place rather than the module in a wrapper, so parameter names (and with them
    checkpoint and adapter keys) stay exactly the native ones.
    """
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def shard_model(root: nn.Module, blocks: nn.ModuleList, compute_dtype: torch.dtype, prefetch: int = 1) -> None:
    """FSDP2 per block then at the root: compute in `compute_dtype`, reduce gradients in fp32.

    LoRA parameters stay fp32 in their shards (and so does the optimizer state); they are cast to the compute
    dtype only for the all-gathered copy used in forward and backward.

    Communication hides behind compute: each block all-gathers the weights of the next `prefetch` blocks as soon
    as its own are in (forward) and of the previous `prefetch` ones in backward, issued from the CPU before those
    blocks are reached. The last block keeps its gathered weights after forward, since backward starts with it
    (and so does the root, FSDP's default for it).
    """
    from torch.distributed.fsdp import (  # with several ranks only: see is_dtensor
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(root, mp_policy=policy)
    register_fsdp_forward_method(root, "logits")  # generation at evals (eval_generations.py) runs the root's logits
    for block, (ahead, behind) in zip(blocks, prefetch_plan(len(blocks), prefetch)):
        block.set_modules_to_forward_prefetch([blocks[j] for j in ahead])
        block.set_modules_to_backward_prefetch([blocks[j] for j in behind])


def prefetch_plan(n_blocks: int, prefetch: int) -> list[tuple[list[int], list[int]]]:
    """For each block, the blocks whose weights it all-gathers ahead of need: the next `prefetch` in forward, and
    in backward (which runs from the last block to the first) the previous `prefetch`, nearest first."""
    return [
        (list(range(i + 1, min(n_blocks, i + 1 + prefetch))), list(range(i - 1, max(-1, i - 1 - prefetch), -1)))
        for i in range(n_blocks)
    ]


def load_streamed_weights(
    module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]] | None, prefix: str = ""
) -> set[str]:
    """Copy named tensors into `module`'s (possibly sharded) parameters; return the names filled.

    Only rank 0 needs `tensors` (the others pass None): rank 0 announces each name, then every rank takes
    its shard with `distribute_tensor`. Without a process group this is a plain copy.
    """
    params = dict(module.named_parameters())
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    filled: set[str] = set()
    tensors = iter(tensors) if tensors is not None else iter(())
    while True:
        item = next(tensors, None) if rank == 0 else None
        if distributed:
            box = [item[0] if item is not None else None]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        else:
            name = item[0] if item is not None else None
        if name is None:
            return filled
        key = prefix + name
        if key not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
        param = params[key]
        # the other ranks' buffer only receives (a broadcast) or gives its shape: made where it is used, the device
        full = item[1] if rank == 0 else torch.empty(_full_shape(param), dtype=param.dtype, device=param.device)
        if tuple(full.shape) != _full_shape(param):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(full.shape)}; the model expects {_full_shape(param)}"
            )
        if is_nf4(param):
            quantize_into(module, key, param, full)
        else:
            _copy_full_into(param, full)
        filled.add(key)


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.shape)  # a DTensor reports its global shape


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            full = full.to(device=param.device, dtype=param.dtype)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def quantize_into(module: nn.Module, key: str, param: torch.Tensor, full: torch.Tensor) -> None:
    """Rank 0's full tensor, in the compute dtype on the device, quantized whole by every rank (the same blocks
    and scales as in one process, whatever the number of ranks), and each rank keeps its rows."""
    full = full.to(device=param.device, dtype=param.dtype)
    if not is_dtensor(param):
        assign_nf4(module, key, to_nf4(full))
        return
    from torch.distributed.tensor import DTensor

    dist.broadcast(full, src=0)
    mesh = param.device_mesh
    rows = nf4_rows(to_nf4(full), mesh.size(), mesh.get_local_rank())
    shard = DTensor.from_local(rows, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
    assign_nf4(module, key, shard)


def lora_init_tensors(module: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-size initial LoRA weights (model.lora's `init_lora_`, from a generator seeded with `seed`), the same
    for any number of ranks."""
    generator = torch.Generator().manual_seed(seed)
    for name, adapted in module.named_modules():
        if isinstance(adapted, LoRALinear):
            a = torch.empty(_full_shape(adapted.lora_A.weight), dtype=torch.float32)
            b = torch.empty(_full_shape(adapted.lora_B.weight), dtype=torch.float32)
            init_lora_(a, b, generator)
            yield f"{name}.lora_A.weight", a
            yield f"{name}.lora_B.weight", b


def init_dora_magnitudes(module: nn.Module) -> set[str]:
    """DoRA's magnitudes set to the loaded weights' row norms, each rank from its own rows (FSDP2 shards a weight
    and its magnitudes along the same rows): no weight is gathered. Returns the names filled."""
    filled = set()
    for name, adapted in module.named_modules():
        if isinstance(adapted, LoRALinear) and adapted.lora_magnitude is not None:
            magnitude, weight = adapted.lora_magnitude.weight, adapted.weight
            init_magnitude_(*(t.to_local() if is_dtensor(t) else t for t in (magnitude, weight)))
            filled.add(f"{name}.lora_magnitude.weight")
    return filled


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather sharded tensors into full CPU tensors (a collective: call it on every rank)."""
    return {
        name: (t.full_tensor() if is_dtensor(t) else t).detach().to("cpu", copy=True) for name, t in tensors.items()
    }
