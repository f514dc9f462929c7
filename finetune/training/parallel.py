"""Parallelism applied to an unchanged model, in one place.

The model is built on the meta device (no memory), LoRA is injected, then `apply_parallelism` gives every block
activation checkpointing, compilation and FSDP2 `fully_shard` as the config asks, and only then is memory
allocated, shard by shard. model/loading.py's `fill_weights` streams the checkpoint in, one tensor at a time, with
its checks; what this file adds is where each tensor goes: rank 0 reads the checkpoint and announces each name
(`broadcast_from_rank0`), and `place_shard` scatters each tensor to the ranks' shards, so N ranks on a node never
hold N copies of the model in CPU memory, and rank 0 holds one tensor at a time. With `model.quantize: nf4`,
each frozen projection is quantized as it arrives, on the device (model/quantize.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.dtensor import is_dtensor
from model.loading import place_tensor
from model.lora import LoRALinear, init_lora_, init_magnitude_
from model.quantize import assign_nf4, is_nf4, nf4_rows, to_nf4

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from finetune.config import ModelConfig
    from model.args import ModelArgs


def apply_parallelism(
    root: nn.Module,
    blocks: nn.ModuleList,
    settings: ModelConfig,
    world_size: int,
    dtype: torch.dtype,
    mesh: DeviceMesh | None = None,
) -> None:
    """Apply everything that changes how the (meta-device) model runs, in the order it must happen.

    Activation checkpointing inside each block, each block compiled with its checkpointing, then FSDP2 over the
    blocks and `root` when there is more than one rank. Names and numbers stay those of the unchanged model.

    Args:
        root: the module FSDP2 wraps last (the loss model), holding `blocks`.
        settings: the `model:` section: activation checkpointing and its scope, compile, fsdp_prefetch.
        dtype: the compute dtype of the sharded weights.
        mesh: FSDP2's device mesh; by default, its own over this machine's accelerator (CUDA where there is one).
    """
    if settings.activation_checkpointing:
        for block in blocks:
            enable_activation_checkpointing(block if settings.checkpointing_scope == "block" else block.feed_forward)
    if settings.compile:
        for block in blocks:
            block.compile()
    if world_size > 1:
        shard_model(root, blocks, compute_dtype=dtype, prefetch=settings.fsdp_prefetch, mesh=mesh)


def compile_note(settings: ModelConfig, args: ModelArgs) -> str | None:
    """What `model.compile` cannot do for this model, said before step 1; None when it compiles as asked.

    In a Mixtral block under activation checkpointing, dynamo stops at the experts' token counts (read on the host),
    and a checkpointed region with a graph break runs eagerly whole.
    """
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


def shard_model(
    root: nn.Module,
    blocks: nn.ModuleList,
    compute_dtype: torch.dtype,
    prefetch: int = 1,
    mesh: DeviceMesh | None = None,
) -> None:
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
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(root, "logits")  # generation at evals (eval_generations.py) runs the root's logits
    for block, (ahead, behind) in zip(blocks, prefetch_plan(len(blocks), prefetch)):
        block.set_modules_to_forward_prefetch([blocks[j] for j in ahead])
        block.set_modules_to_backward_prefetch([blocks[j] for j in behind])


def prefetch_plan(n_blocks: int, prefetch: int) -> list[tuple[list[int], list[int]]]:
    """For each block, the blocks whose weights it all-gathers ahead of need.

    Returns:
        Per block, (forward, backward): the indices of the next `prefetch` blocks, and, as backward runs from the last
        block to the first, of the previous `prefetch`, nearest first.
    """
    return [
        (list(range(i + 1, min(n_blocks, i + 1 + prefetch))), list(range(i - 1, max(-1, i - 1 - prefetch), -1)))
        for i in range(n_blocks)
    ]


def broadcast_from_rank0(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 0's stream of (name, full tensor) on every rank, for model.loading's `fill_weights`.

    Only rank 0 reads `tensors` and announces each name; the others get an empty buffer of the parameter's full
    shape, which `place_shard` fills by a broadcast or takes only the shape of. Without a process group, the stream
    itself.

    Args:
        tensors: the checkpoint's (name, tensor) stream on rank 0; None on the other ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield from tensors
        return
    params = dict(model.named_parameters())
    rank = dist.get_rank()
    tensors = iter(tensors) if rank == 0 else None
    while True:
        item = next(tensors, None) if rank == 0 else None
        box = [item[0] if item is not None else None]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
        if name is None:
            return
        if rank == 0:
            yield item
        elif (param := params.get(name)) is None:
            yield name, torch.empty(0, device="meta")  # every rank raises at the same unknown name
        else:
            # made where it is used, on the device: it only receives (a broadcast) or gives its shape
            yield name, torch.empty(_full_shape(param), dtype=param.dtype, device=param.device)


def place_shard(model: nn.Module, name: str, full: torch.Tensor) -> None:
    """Place rank 0's full tensor into this rank's shard of parameter `name`: model.loading's `place` for FSDP2.

    Each rank keeps its shard (`distribute_tensor`), and an NF4 weight is quantized whole by every rank (the same
    blocks and scales as in one process, whatever the number of ranks), each rank keeping its rows. An unsharded
    parameter is placed as in one process. A collective for a sharded parameter.
    """
    param = model.get_parameter(name)
    if not is_dtensor(param):
        place_tensor(model, name, full)
        return
    full = full.to(device=param.device, dtype=param.dtype)
    if is_nf4(param):
        from torch.distributed.tensor import DTensor

        dist.broadcast(full, src=0)
        mesh = param.device_mesh
        rows = nf4_rows(to_nf4(full), mesh.size(), mesh.get_local_rank())
        shard = DTensor.from_local(
            rows, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
        assign_nf4(model, name, shard)
    else:
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
        with torch.no_grad():
            param.to_local().copy_(shard.to_local())


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.shape)  # a DTensor reports its global shape


def init_lora_shards(model: nn.Module, seed: int) -> None:
    """Initialise every adapter's A and B full size, then keep each rank's shard: the same values for any world size.

    The values are model.lora's `init_lora_`, from a generator seeded with `seed`, placed by `place_shard`.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, adapted in model.named_modules():
        if isinstance(adapted, LoRALinear):
            a = torch.empty(_full_shape(adapted.lora_A.weight), dtype=torch.float32)
            b = torch.empty(_full_shape(adapted.lora_B.weight), dtype=torch.float32)
            init_lora_(a, b, generator)
            place_shard(model, f"{name}.lora_A.weight", a)
            place_shard(model, f"{name}.lora_B.weight", b)


def init_dora_magnitudes(model: nn.Module) -> None:
    """Set DoRA's magnitudes to the loaded weights' row norms, each rank from its own rows: no weight is gathered.

    FSDP2 shards a weight and its magnitudes along the same rows, so a rank's rows hold all it needs.
    """
    for adapted in model.modules():
        if isinstance(adapted, LoRALinear) and adapted.lora_magnitude is not None:
            magnitude, weight = adapted.lora_magnitude.weight, adapted.weight
            init_magnitude_(*(t.to_local() if is_dtensor(t) else t for t in (magnitude, weight)))


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather sharded tensors into full CPU tensors (a collective: call it on every rank)."""
    return {
        name: (t.full_tensor() if is_dtensor(t) else t).detach().to("cpu", copy=True) for name, t in tensors.items()
    }
