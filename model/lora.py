"""LoRA: low-rank adapters around frozen Linear layers, `y = W x + scaling · B A dropout(x)`.

`LoRALinear` keeps the frozen weight under the name `weight`, so base checkpoints load unchanged, and adds
`lora_A` [r, in] and `lora_B` [out, r]. Adapter keys are therefore the native ones mistral-inference loads:
`layers.0.attention.wq.lora_A.weight`. LoRA parameters are created in fp32 whatever the base dtype: their
updates are far smaller than bf16's resolution around the frozen weights.

The variants, as peft implements them: rsLoRA only changes scaling (alpha / sqrt(r) for alpha / r); DoRA adds
`lora_magnitude.weight` [out], and the layer computes `m / ‖W + scaling · B A‖ · (W + scaling · B A) x`, the
row norms taken without gradient (DoRA's section 4.3).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from model.settings import (
    LoRAArgs,
    lora_scaling,
)  # the adapters' settings, apart so that the config reads them without torch


def is_lora_name(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to an adapter."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude." in name


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return W + scaling · B A, computed in fp32, in W's dtype.

    Every merge here is done this way, so a model merged in place, a merged state dict and `tailor merge` agree bit
    for bit.

    Args:
        magnitude: DoRA's magnitudes; each merged row is rescaled to its own.
    """
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        merged = merged * (magnitude.float() / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1)
    return merged.to(weight.dtype)


class Magnitude(nn.Module):
    """DoRA's trained magnitude of each output row.

    A module so that its key reads like LoRA's: `layers.0.attention.wq.lora_magnitude.weight` (peft's
    `lora_magnitude_vector`).
    """

    def __init__(self, out_features: int, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features, device=device, dtype=torch.float32))


class LoRALinear(nn.Module):
    """A frozen bias-free Linear plus a trainable low-rank update, mergeable into the weight in place.

    Args:
        base: the Linear wrapped; its weight is kept (not copied) and frozen.
        alpha: with `rank`, sets the scaling: alpha / rank, or alpha / sqrt(rank) with `rslora`.
        dropout: the probability of dropping the adapter's input in training.
        dora: add DoRA's magnitudes (`lora_magnitude`).

    Raises:
        ValueError: `base` has a bias.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False, dora: bool = False
    ):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free Linear layers only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude = Magnitude(self.out_features, device) if dora else None
        self.merged = False
        init_lora_(self.lora_A.weight, self.lora_B.weight)
        if dora and device.type != "meta":
            init_magnitude_(self.lora_magnitude.weight, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute W x plus the adapter's update (nothing more once merged).

        The adapter computes in the input's dtype: its fp32 weights are cast (r x in, out x r: small), never the
        activations, as FSDP's mixed precision casts them on several GPUs; their gradients stay fp32. With an NF4
        weight (model/quantize.py), F.linear is torchao's linear_nf4: the weight dequantized for this matmul only.
        """
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        dropped = self.dropout(x)
        u = F.linear(dropped, a)
        if self.lora_magnitude is not None:
            return self._dora_forward(x, dropped, y, F.linear(u, b))
        # y += scaling · u Bᵀ in one in-place addmm (autograd keeps x, not y): the scaling rides in the matmul rather
        # than in a multiply, an add and a copy over every [tokens, out] output, forward and backward
        return y.flatten(0, -2).addmm_(u.flatten(0, -2), b.t(), alpha=self.scaling).view_as(y)

    def _dora_forward(self, x: torch.Tensor, dropped: torch.Tensor, y: torch.Tensor, lora_out: torch.Tensor):
        """peft's DoRA, in its order of operations: W x + (m / norm - 1) W x + (m / norm) B A x · scaling, with
        norm = ‖W + scaling · B A‖ per row; with dropout in training, the middle term's W x is W dropout(x), as
        peft's (its base result is recomputed on the dropped-out input)."""
        with torch.no_grad():  # the norm is a constant to autograd (DoRA's section 4.3, peft's `detach`)
            delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
            norm = torch.linalg.vector_norm(self.weight.float() + self.scaling * delta, dim=1)
        scale = (self.lora_magnitude.weight / norm).to(x.dtype)
        without_dropout = isinstance(self.dropout, nn.Identity) or not self.training
        base = y if without_dropout else F.linear(dropped, self.weight)
        return y + ((scale - 1) * base + scale * lora_out * self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the weight in place (once); the forward then skips the LoRA branch."""
        if not self.merged:
            magnitude = None if self.lora_magnitude is None else self.lora_magnitude.weight
            merged = merged_weight(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, magnitude)
            self.weight.copy_(merged)
            self.merged = True

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.out_features}, scaling={self.scaling}{dora}"


@torch.no_grad()
def init_lora_(lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Initialise an adapter in place, the one way: A Kaiming-uniform (nn.Linear's default), B zeros.

    The adapter so starts as an exact no-op.

    Args:
        generator: draws A; training passes a seeded one on full-size tensors, so A is the same for any number of
            ranks (finetune/training/parallel.py).
    """
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(lora_B)


@torch.no_grad()
def init_magnitude_(magnitude: torch.Tensor, weight: torch.Tensor) -> None:
    """Set DoRA's magnitudes to the norms of W's rows, in place.

    B is zero, so W + scaling · B A is W: an exact no-op. Row by row, so FSDP's local shards of a weight and of its
    magnitudes, which hold the same rows, init alike.
    """
    magnitude.copy_(torch.linalg.vector_norm(weight.float(), dim=1))


def inject_lora(model: nn.Module, lora: LoRAArgs) -> None:
    """Replace every Linear named in `lora.targets` (every MoE expert's w1/w2/w3 included) by a LoRALinear, in place.

    On a meta-device model the LoRA weights are meta too: call `init_lora_weights` after `to_empty`.

    Raises:
        ValueError: no Linear layer of the model matches the targets.
    """
    targets = [(name, module) for name, module in model.named_modules() if _is_target(name, module, lora.targets)]
    if not targets:
        raise ValueError(f"no Linear layer of the model matches LoRA targets {lora.targets}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapted = LoRALinear(module, lora.rank, lora.alpha, lora.dropout, lora.rslora, lora.dora)
        setattr(parent, child, adapted.train(module.training))  # an eval model must not start dropping out


def _is_target(name: str, module: nn.Module, targets: tuple[str, ...]) -> bool:
    return type(module) is nn.Linear and name.rpartition(".")[2] in targets


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """Every LoRALinear of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def init_lora_weights(model: nn.Module) -> None:
    """(Re)initialise every adapter: A Kaiming-uniform, B zeros, DoRA's magnitudes W's row norms."""
    for module in lora_modules(model):
        init_lora_(module.lora_A.weight, module.lora_B.weight)
        if module.lora_magnitude is not None:
            init_magnitude_(module.lora_magnitude.weight, module.weight)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Make the adapters' parameters the only ones that require grad."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name))


@contextmanager
def lora_switched_off(model: nn.Module) -> Iterator[None]:
    """Make the model compute as its base inside the block.

    Every adapter's scaling is 0 (so no second model is held in memory), and restored on the way out, whatever
    happens inside.

    Raises:
        ValueError: an adapter is merged into its weight.
    """
    modules = lora_modules(model)
    if any(m.merged for m in modules):
        raise ValueError("cannot switch off adapters merged into their weights")
    scalings = [m.scaling for m in modules]
    for module in modules:
        module.scaling = 0.0
    try:
        yield
    finally:
        for module, scaling in zip(modules, scalings):
            module.scaling = scaling


def merge_lora(model: nn.Module) -> None:
    """Add every adapter into its weight in place; the forward then skips the LoRA branch. Idempotent."""
    for module in lora_modules(model):
        module.merge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the base weights with every unmerged adapter added in, without touching the model.

    Native names, each weight's own dtype, no LoRA keys. Sharded (DTensor) weights give merged weights sharded the
    same way.
    """
    adapters = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    merged = {}
    for key, tensor in model.state_dict().items():
        if is_lora_name(key):
            continue
        module = adapters.get(key)
        if module is not None and not module.merged:
            magnitude = None if module.lora_magnitude is None else module.lora_magnitude.weight
            tensor = merged_weight(tensor, module.lora_A.weight, module.lora_B.weight, module.scaling, magnitude)
        merged[key] = tensor.detach()
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under native names, in their stored dtype (fp32 unless the model was cast)."""
    return {name: t.detach() for name, t in model.state_dict().items() if is_lora_name(name)}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy adapter weights into an injected model.

    Args:
        strict: missing or unexpected keys are errors too (mis-shaped keys always are).

    Raises:
        ValueError: naming the keys that do not match, or the model's adapters are merged.
    """
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: adapter {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = [f"mis-shaped {misshaped}"] if misshaped else []
    if strict:
        problems += [f"missing {missing}"] if missing else []
        problems += [f"unexpected {unexpected}"] if unexpected else []
    if problems:
        raise ValueError("LoRA state dict does not match the model: " + "; ".join(problems))
    if any(m.merged for m in lora_modules(model)):
        raise ValueError("cannot load adapters into a merged model: load them before merge_lora(model)")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
