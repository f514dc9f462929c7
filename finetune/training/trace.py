"""One real training step of a config's model, at full size, traced on tensors that hold no memory.

`tailor validate CONFIG --trace [--device h100]` builds the model as a run does (meta device, LoRA, NF4 where
configured, activation checkpointing), makes its parameters fake tensors (FakeTensorMode: shapes and dtypes, no
bytes) in the dtype `auto` picks on the named GPU, and runs one real `train_step` (forward, chunked loss, backward
with recomputation, clipping, fused AdamW) on a packed row of `seq_len` tokens. It reports the bytes of the frozen
weights and of the LoRA state, the peak of the bytes the step's tensors hold at once, the FLOPs per token
(torch.utils.flop_counter's formulas), the attention backend `auto` picks on that GPU and the attention kernels the
traced step called, and every host synchronisation in the step.

The fake tensors are CPU tensors: in a PyTorch built without CUDA, fake CUDA tensors fail at Python indexing and at
autograd's dtype casts (both ask for a CUDA device guard). So the traced kernels are the CPU's (SDPA's flash kernel
per document); the backend named is the one the GPU run takes. The host side of a step stays real: the batch, its
document lengths and what is made from them (positions, document ids, the trained positions) are small real
tensors. Where the device's values decide a shape (Mixtral's per-expert token counts), the trace counts the host
synchronisation and routes the tokens evenly over the experts.

With several ranks (`--gpus N`), the model is sharded by FSDP2 as a run shards it, over a fake process group of N ranks
in this process (torch's "fake" backend: collectives that move no data), and the step is rank 0's: its weight and LoRA
shards, and beside them the weights FSDP2 gathers whole. FSDP2 frees a gathered weight by resizing its storage, which
the byte counter watches, and makes its buffers from no tensor, which the host side leaves to the fake mode.

NF4 weights are quantized by torchao from a fake full weight before the host side begins (its tensor-less calls, the
full weight and torchao's buffer of codes, would be real there), so their codes and scales are fake, and so are the
dequantized copies and torchao's intermediates each matmul makes: the byte counter holds them while they live.

Not traced: the CUDA context (about 0.5 GiB outside PyTorch), kernel workspaces, the allocator's fragmentation and
NCCL's buffers.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from finetune.config import TrainConfig
from finetune.data.packing import Batch
from finetune.planning.memory_estimate import GIB, LORA_BYTES_PER_PARAMETER
from finetune.training.model_setup import build_meta_training_model
from finetune.training.optim import build_optimizer
from finetune.training.parallel import place_shard
from finetune.training.precision import DTYPES
from finetune.training.train_step import train_step
from model.args import ModelArgs
from model.attention import resolve_backend
from model.dtensor import is_dtensor
from model.quantize import is_nf4


@dataclass(frozen=True)
class GpuKind:
    """A GPU a step is traced as on: what `auto` picks on it (dtype, attention backend) and its memory."""

    name: str
    memory: int  # bytes
    capability: tuple[int, int]


GPU_KINDS = {
    "h100": GpuKind("NVIDIA H100 80GB HBM3", 80 * GIB, (9, 0)),
    "h200": GpuKind("NVIDIA H200", 141 * GIB, (9, 0)),
    "a100": GpuKind("NVIDIA A100-SXM4-80GB", 80 * GIB, (8, 0)),
    "t4": GpuKind("Tesla T4", 15 * GIB, (7, 5)),
}
# the device ops that make the host wait: a value read, or an output whose size depends on the values
SYNCING = {
    "_local_scalar_dense": "item",  # .item(), .tolist(), bool(t), int(t), float(t)
    "nonzero": "nonzero",
    "bincount": "bincount",
    "repeat_interleave": "repeat_interleave",
    "_unique2": "unique",
    "masked_select": "masked_select",
}


@dataclass
class StepTrace:
    """What one traced step holds and does, per rank."""

    gpu: str
    ranks: int  # FSDP2's, this trace being rank 0's
    dtype: torch.dtype
    backend: str
    tokens: int  # per rank
    frozen: int  # bytes: the frozen weights as stored (bf16, fp16 or NF4)
    lora_state: int  # bytes: LoRA weights, their gradients, AdamW's moments
    flops: int  # the step's, this rank's, recomputation included
    attention_kernels: list[str]
    host_syncs: list[str]  # one entry per synchronisation, in order
    # bytes, in a step after the first (AdamW's moments held throughout):
    held: int  # as the step begins: the frozen weights, the LoRA weights and AdamW's moments (not the gradients)
    saved: int  # the activations the forward keeps for backward: what it holds when the body's last block is done
    loss: int  # the loss's own high-water mark above the kept activations (final norm, head's chunk, its gradients)
    # each phase's highest ("forward", "loss", "backward", "optimizer": AdamW's update) as (bytes the step's tensors
    # hold at once, of which weights FSDP2 holds whole)
    phases: dict[str, tuple[int, int]]

    @property
    def peak_in(self) -> str:
        """The phase where the step peaks."""
        return max(self.phases, key=lambda phase: self.phases[phase][0])

    @property
    def peak(self) -> int:
        """Bytes: the most the step's tensors hold at once."""
        return self.phases[self.peak_in][0]

    @property
    def gathered(self) -> int:
        """Bytes of weights FSDP2 holds whole at the peak (0 on one rank)."""
        return self.phases[self.peak_in][1]

    @property
    def transient(self) -> int:
        """The rest of the peak beyond what it holds from the step's start, the gathered weights and (in the loss or
        backward) the saved activations: a block's recomputation or the loss's chunk, with the LoRA gradients made so
        far; in forward, the activations made so far; in the optimizer, the gradients and its update."""
        return self.peak - self.held - self.gathered - (self.saved if self.peak_in in SAVED_HELD_IN else 0)

    @property
    def flops_per_token(self) -> float:
        """The step's FLOPs over its tokens, both this rank's, recomputation included."""
        return self.flops / self.tokens

    def breakdown(self) -> str:
        """The peak by what holds it: held from the step's start, then what the step adds (the saved activations are
        part of it where the peak is in the loss or backward, the phases that hold them all)."""
        gathered = f" + weights gathered whole {self.gathered / GIB:.2f}" if self.ranks > 1 else ""
        saved = f"saved activations {self.saved / GIB:.2f}"
        holds_saved = self.peak_in in SAVED_HELD_IN
        return (
            f"= weights, LoRA and AdamW {self.held / GIB:.2f}{gathered}{' + ' + saved if holds_saved else ''} "
            f"+ largest transient {self.transient / GIB:.2f}, in {self.peak_in}{'' if holds_saved else '; ' + saved}"
            f"; the loss alone {self.loss / GIB:.2f}"
        )

    def summary(self) -> str:
        """The trace in one line: dtype and backend, weights, LoRA state, peak by part, FLOPs, kernels, host syncs."""
        syncs = sorted(set(self.host_syncs))
        ranks = "" if self.ranks == 1 else f", rank 0 of {self.ranks} under FSDP2, per rank"
        return (
            f"trace (as on {self.gpu}{ranks}: {str(self.dtype).removeprefix('torch.')}, attention {self.backend}): "
            f"frozen weights {self.frozen / GIB:.2f} GiB, LoRA + gradients + AdamW {self.lora_state / GIB:.2f} GiB, "
            f"peak {self.peak / GIB:.2f} GiB ({self.breakdown()} GiB); "
            f"{self.flops_per_token / 1e9:.2f} GFLOP per token (recomputation included); traced kernels "
            f"{', '.join(self.attention_kernels) or 'none'}; host syncs in the step: {len(self.host_syncs)}"
            + (f" ({', '.join(f'{s} x{self.host_syncs.count(s)}' for s in syncs)})" if syncs else "")
        )


SAVED_HELD_IN = ("loss", "backward")  # the phases that hold every saved activation: from the forward's end on


def trace_dtype(name: str, gpu: GpuKind) -> torch.dtype:
    """precision.compute_dtype's choice on `gpu`: `auto` is bf16 from compute capability 8.0, fp16 below."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if gpu.capability >= (8, 0) else torch.float16


def traced_batch(seq_len: int, vocab_size: int) -> Batch:
    """A packed row of `seq_len` tokens, four documents, every target trained (the loss's worst case)."""
    quarter = seq_len // 4
    seqlens = [quarter, quarter, quarter, seq_len - 3 * quarter]
    tokens = torch.arange(seq_len + 1) % vocab_size
    return Batch(tokens[:-1], tokens[1:], torch.ones(seq_len), [n for n in seqlens if n > 0])


class _HostSide(TorchFunctionMode):
    """Inside the fake mode, the host side of the step stays real: an op on real CPU tensors only (the batch, its
    document lengths and what is made from them) runs for real, so its values (and data-dependent shapes) exist."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # FSDP2's own buffers (gathered weights, gradients to reduce) are the device's, though made from no tensor
        made_by_fsdp = not tensors and sys._getframe(1).f_globals.get("__name__", "").startswith("torch.distributed.")
        if not made_by_fsdp and not any(_is_fake(t) or t.is_meta for t in tensors):
            with _fake_mode_off():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _HostSyncs(TorchDispatchMode):
    """Every op on the step's (fake) device tensors that makes the host wait for the device: a value read (`item`,
    `tolist`, a branch on a tensor) or an output whose size depends on the values. Mixtral's per-expert counts are
    answered with an even split of the tokens."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.even_items, self.even_value = 0, 0  # the expert counts' elements still to read, and their value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(_is_fake(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and self.even_items:
            self.even_items -= 1  # FakeTensor's tolist reads element by element: one read of the counts, counted once
            return self.even_value
        if name in SYNCING:
            self.syncs.append(SYNCING[name])
            if name == "bincount":
                values, bins = args[0], kwargs.get("minlength", args[2] if len(args) > 2 else 0)
                self.even_items, self.even_value = bins, values.numel() // bins
                self.syncs.append("tolist")
                return torch.full((bins,), values.numel() // bins, dtype=torch.long, device=values.device)
        return func(*args, **kwargs)


class _LiveBytesAndFlops(TorchDispatchMode):
    """The bytes the step's fake tensors hold over time (each storage counted once, from the op that made it until a
    weak reference's callback says it is freed) and their highest sum; and the FLOPs of the ops, by
    torch.utils.flop_counter's formulas (its FlopCounterMode's module hooks keep tensors alive, raising the peak)."""

    def __init__(self):
        super().__init__()
        self.live, self.flops = 0, 0
        self._sizes: dict[int, int] = {}
        self.sharded: list = []  # FSDP2's parameter groups (FSDPParamGroup), whose all-gather buffers hold weights
        self.phase = "forward"  # then "loss" from the final norm on, then "backward", then "optimizer"
        self.marks: dict[str, tuple[int, int]] = {}  # phase -> (live, gathered) as it began
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> (live, gathered) at its highest

    @property
    def gathered(self) -> int:
        """Bytes of whole weights FSDP2 holds now: each weight's all-gather buffer (its storage empty while resharded),
        and the flat all-gather outputs not yet freed (in forward, the last one is kept until the next gather)."""
        buffers = [t for group in self.sharded for param in group.fsdp_params for t in param.all_gather_outputs]
        pending = [group._all_gather_result for group in self.sharded]
        if self.sharded and (deferred := getattr(self.sharded[0].comm_ctx, "all_gather_state", None)):
            pending.append(deferred.all_gather_result)
        flat = {id(r.all_gather_output): r.all_gather_output for r in pending if r is not None}
        return sum(t.untyped_storage().nbytes() for t in buffers + list(flat.values()))

    def enter(self, phase: str) -> None:
        """The step moves on to `phase`; the bytes held as it begins are kept."""
        self.phase = phase
        self.marks.setdefault(phase, (self.live, self.gathered))

    def _count(self, change: int) -> None:
        self.live += change
        if change > 0 and self.live > self.peaks.get(self.phase, (-1, 0))[0]:
            self.peaks[self.phase] = (self.live, self.gathered)

    def hold(self, tensor: torch.Tensor) -> None:
        """Count a fake tensor's storage as held until it is freed (each storage once; NF4's codes and scales)."""
        if not _is_fake(tensor):
            return
        flatten = getattr(tensor, "__tensor_flatten__", None)
        if flatten is not None and not isinstance(tensor, _fake_tensor_type()):  # NF4: its codes and scales
            for name in flatten()[0]:
                self.hold(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self._count(storage.nbytes())
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self._count(-self._sizes.pop(key))

    def __enter__(self):
        # FSDP2 frees a gathered weight by resizing its storage to 0 bytes and gathers it again into the same storage:
        # a storage's resize_ dispatches no op, so it is watched here (as torch.distributed._tools.mem_tracker does)
        resize = self._resize = torch.UntypedStorage.resize_

        def counted_resize(storage: torch.UntypedStorage, size: int) -> None:
            resize(storage, size)
            if (key := storage._cdata) in self._sizes:
                change = storage.nbytes() - self._sizes[key]
                self._sizes[key] = storage.nbytes()
                self._count(change)

        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        if self.phase != "backward" and torch._C._current_graph_task_id() != -1:  # autograd's engine runs the op
            self.enter("backward")
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.hold(tensor)
        return out


class _OpNames(TorchDispatchMode):
    """The names of the attention ops a step dispatches."""

    def __init__(self):
        super().__init__()
        self.attention: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().removeprefix("aten::")
        if ("attention" in name or "flash" in name or "varlen" in name) and name not in self.attention:
            self.attention.append(name)
        return func(*args, **(kwargs or {}))


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(tensor, FakeTensor):
        return True
    inner = getattr(tensor, "__tensor_flatten__", None)  # a subclass (NF4) holding fake tensors
    return inner is not None and any(_is_fake(getattr(tensor, n)) for n in inner()[0])


def _fake_tensor_type() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def _fake_mode_off():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def trace_step(cfg: TrainConfig, args: ModelArgs, gpu: str | GpuKind = "h100", world_size: int = 1) -> StepTrace:
    """Trace one train_step of `cfg`'s model on fake tensors, as rank 0 of `world_size` would run it on `gpu`.

    With several ranks the model is sharded as a run shards it, over a fake process group: its collectives move no
    data, and each rank's figures are rank 0's. The module docstring says what is traced and what is not.

    Args:
        args: the model's shape, as its params.json or config.json describes it.
        gpu: a GPU_KINDS name, or the GpuKind of the GPU at hand.
    """
    with _fake_ranks(world_size):
        return _trace_step(cfg, args, gpu, world_size)


@contextmanager
def _fake_ranks(world_size: int):
    """A process group of `world_size` ranks in this process, as its rank 0, whose collectives do nothing."""
    if world_size == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # its module registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trace_step(cfg: TrainConfig, args: ModelArgs, gpu: str | GpuKind, world_size: int) -> StepTrace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    kind = GPU_KINDS[gpu] if isinstance(gpu, str) else gpu
    device = torch.device("cpu")
    dtype = trace_dtype(cfg.model.dtype, kind)
    backend = resolve_backend(cfg.model.attention, torch.device("cuda"), dtype, kind.capability)
    # eagerly: a compiled block would be compiled for the fake tensors, and saves what eager saves
    eager = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile=False))
    # FSDP2's mesh on the CPU, where the fake tensors are: its default is the accelerator's, CUDA on a GPU machine
    mesh = None if world_size == 1 else _cpu_mesh(world_size)
    loss_model = build_meta_training_model(eager, args, dtype, world_size, mesh)
    batch = traced_batch(cfg.seq_len * cfg.batch_size, args.vocab_size)

    syncs, names = _HostSyncs(), _OpNames()
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss_model.to_empty(device=device)
        for name, param in list(loss_model.named_parameters()):
            # as the loader does: quantized from a full weight, all of it fake (before the host side, which would make
            # the tensor-less empty calls, the full weight and torchao's codes buffer, real)
            if is_nf4(param):
                place_shard(loss_model, name, torch.empty(param.shape, dtype=param.dtype, device=device))
        with _HostSide():
            lora = [p for p in loss_model.parameters() if p.requires_grad]
            optimizer = build_optimizer(lora, cfg.optim)
            live = _LiveBytesAndFlops()
            for param in loss_model.parameters():
                live.hold(param)
            live.sharded = _fsdp_groups(loss_model)
            live.enter("forward")
            # the body's last block is done when the final norm begins: from there on, the loss
            loss_model.model.norm.register_forward_pre_hook(lambda module, args: live.enter("loss"))
            optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: live.enter("optimizer"))
            with names, syncs, live, warnings.catch_warnings():
                # torchao's NF4 checks after FSDP2's all-gather that the gathered codes are the output's by data_ptr,
                # which a fake tensor warns about (its pointers compare equal all the same)
                warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor", UserWarning)
                train_step(loss_model, optimizer, [batch], device, cfg.optim.max_grad_norm, 1)
    lora_shards = [_shard(p) for p in lora]
    lora_weights = sum(p.numel() * p.element_size() for p in lora_shards)
    weights = sum(_nbytes(_shard(p)) for p in loss_model.parameters())
    lora_state = sum(p.numel() for p in lora_shards) * LORA_BYTES_PER_PARAMETER
    # a later step's peak: AdamW's two moments, made in this first step's update, are held through every step after
    moments = 8 * sum(p.numel() for p in lora_shards)
    peaks = {phase: (held + moments, gathered) for phase, (held, gathered) in live.peaks.items()}
    if "optimizer" in live.peaks:  # the update that made them holds them already
        peaks["optimizer"] = live.peaks["optimizer"]
    (start, start_gathered), (kept, kept_gathered) = live.marks["forward"], live.marks["loss"]
    saved = (kept - kept_gathered) - (start - start_gathered)
    return StepTrace(
        gpu=gpu if isinstance(gpu, str) else gpu.name,
        ranks=world_size,
        dtype=dtype,
        backend=backend,
        tokens=batch.tokens.numel(),
        frozen=weights - lora_weights,
        lora_state=lora_state,
        flops=live.flops,
        attention_kernels=names.attention,
        host_syncs=syncs.syncs,
        held=start + moments,
        saved=saved,
        loss=live.peaks["loss"][0] - kept,
        phases=peaks,
    )


def _cpu_mesh(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _fsdp_groups(model: torch.nn.Module) -> list:
    """FSDP2's groups of sharded parameters (FSDPParamGroup, one per fully_shard call); none on one rank."""
    groups = (
        module._get_fsdp_state()._fsdp_param_group for module in model.modules() if hasattr(module, "_get_fsdp_state")
    )
    return [group for group in groups if group is not None]


def _shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its FSDP2 shard, or the whole."""
    return param.to_local() if is_dtensor(param) else param


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes a (fake) tensor holds, an NF4 tensor's packed codes and scales included."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and not isinstance(tensor, _fake_tensor_type()):
        return sum(_nbytes(getattr(tensor, name)) for name in flatten()[0])
    return tensor.untyped_storage().nbytes()


def trace_by_layers(cfg: TrainConfig, args: ModelArgs, gpu: str | GpuKind = "h100", world_size: int = 1) -> StepTrace:
    """The step of the full model, as trace_step would give it, from traces of 1, 2 and 3 of its layers.

    Every block is the same, so the weights, the LoRA state, the FLOPs and the host syncs grow by exactly the second
    trace's difference per layer, and the peak by the third's (from two layers on, the peak is in the same place: the
    last block's recomputation, with every block's input kept); so does each phase's highest (the forward's, the
    loss's, backward's, the optimizer's), and the step's peak is the highest of the phases' at the full depth. Three
    small traces take seconds on a CPU.
    """
    one, two = (trace_step(cfg, dataclasses.replace(args, n_layers=n), gpu, world_size) for n in (1, 2))
    more = args.n_layers - 1
    grown = {
        name: getattr(one, name) + more * (getattr(two, name) - getattr(one, name))
        for name in ("frozen", "lora_state", "held", "flops")
    }
    if args.n_layers > 1:
        three = trace_step(cfg, dataclasses.replace(args, n_layers=3), gpu, world_size) if args.n_layers > 2 else two
        deeper = args.n_layers - 2
        grown["saved"] = two.saved + deeper * (three.saved - two.saved)
        grown["phases"] = {
            phase: (two.phases[phase][0] + deeper * (three.phases[phase][0] - two.phases[phase][0]), gathered)
            for phase, (_, gathered) in three.phases.items()
        }
        grown["loss"] = three.loss
    per_layer = two.host_syncs[len(one.host_syncs) :]  # the second layer's, in order
    return dataclasses.replace(one, **grown, host_syncs=one.host_syncs + per_layer * more)


def this_gpu() -> GpuKind:
    """The first CUDA device of this machine as the trace knows a GPU: its name, memory and compute capability."""
    properties = torch.cuda.get_device_properties(0)
    return GpuKind(properties.name, properties.total_memory, (properties.major, properties.minor))


def trace_before_start(cfg: TrainConfig, args: ModelArgs, world_size: int) -> str | None:
    """The trace line a run prints before its model is built.

    A first GPU run so shows the peak it will reach beside the step lines' measured `peak mem`.

    `model.trace`: `auto` traces on a GPU, as on that GPU; `always` on the CPU too, as on an H100; `never` not at all.
    Run before the process group exists (the trace opens a fake one of `world_size` ranks), by the caller's rank 0.

    Returns:
        The summary line, a line saying why the step could not be traced (the run goes on: a trace is a forecast),
        or None when no trace is asked for here.
    """
    if cfg.model.trace == "never" or (cfg.model.trace == "auto" and not torch.cuda.is_available()):
        return None
    gpu = this_gpu() if torch.cuda.is_available() else "h100"  # every rank's GPU is of one kind
    try:
        return trace_by_layers(cfg, args, gpu, world_size).summary()
    except Exception as error:  # noqa: BLE001 - a forecast that fails must not stop the run it forecasts
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        return f"trace: not traced ({reason}); the run goes on"
