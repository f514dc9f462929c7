"""Peak memory per GPU of a training run, from its config and the model's shape: formulas a reader can check.

With N = seq_len · batch_size tokens per rank, W ranks, b bytes per value of the compute dtype (2 for bf16/fp16,
4 for fp32), L layers, d = dim, q = n_heads · head_dim, k = n_kv_heads · head_dim, h = hidden_dim, V = vocab:

    weights      the frozen projections: P_proj · 2 bytes in bf16 (4 in fp32), or P_proj · 4.127 / 8 in NF4
                 (model/quantize.py); the embeddings, norms, router and head: P_rest · b. FSDP divides them by W,
                 and holds whole, beside its shard, the blocks it has gathered (the one computing and
                 `model.fsdp_prefetch` ahead) and the root's embeddings, norm and head.
    lora         P_lora · 16 / W: fp32 weights (4), their fp32 gradients (4), AdamW's two fp32 moments (8); DoRA's
                 magnitudes (one per output row of each adapted weight) are LoRA parameters too.
    activations  with `model.activation_checkpointing` and scope `block`: every block keeps its input, L · N · d · b,
                 and backward recomputes one block at a time: N · (a_attn + a_mlp), where, per token,
                     a_attn = (4 + 2b) d + b (q + 2k) + (4 + b) (q + k) + b q   (norm in fp32, q k v, rotary in
                              fp32, attention output, the residual)
                     a_mlp  = (4 + 2b) d + 4 b h                                (norm, w1 and w3 outputs, silu,
                              their product)
                 scope `mlp` keeps the attention's activations of every block: L · N · (d b + a_attn) + N · a_mlp;
                 without checkpointing every block keeps its activations: L · N · (a_attn + a_mlp). An MoE layer's
                 a_mlp is per chosen expert: times num_experts_per_tok.
    loss         one chunk of the chunked loss, C = min(N, 1024) trained tokens (DEFAULT_CHUNK_SIZE):
                 C · V · (b + c + 4): its logits in the compute dtype, their fp32 copy (c = 4; none in fp32, c = 0),
                 and one fp32 array beside them (the log-probabilities, then their gradient).

Not counted: the CUDA context and cuBLAS / attention workspaces (outside PyTorch's allocator), allocator
fragmentation, a vision tower (never loaded), on a CPU the attention's n_heads · N · 4 bytes of scores a token (the
GPU's flash attention holds none), and with DoRA the fp32 W + scaling · B A of one adapted weight at a
time, made and dropped to take its row norms. `fits` keeps 10% of the GPU for them. The figure compares with
torch.cuda.max_memory_allocated; tests/train/test_memory_estimate.py checks it against measured peaks on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import DEFAULT_CHUNK_SIZE, TrainConfig
from model.args import ModelArgs, load_model_args
from model.settings import NF4_BITS_PER_WEIGHT

GIB = 2**30
HEADROOM = 0.10  # of the GPU's memory, kept for what the formulas leave out (the module docstring)
LORA_BYTES_PER_PARAMETER = 4 + 4 + 8
# bytes per value of `model.dtype`, without torch (`tailor validate` estimates in a process that never loads it);
# `auto` computes in 2 bytes a value on a GPU, bf16 or fp16 alike
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""

    weights: float
    lora: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        """All bytes per GPU: weights, LoRA state, activations and the loss's chunk."""
        return self.weights + self.lora + self.activations + self.loss

    def summary(self) -> str:
        """`about 15.2 GiB per GPU (weights ..., lora ..., activations ..., loss ... GiB)`."""
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}" for name in ("weights", "lora", "activations", "loss")
        )
        return f"about {self.total / GIB:.1f} GiB per GPU ({parts} GiB)"


def projection_parameters(args: ModelArgs) -> int:
    """The weights `model.quantize: nf4` stores in 4 bits: wq wk wv wo, and w1 w2 w3 of every expert."""
    q, k = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    experts = args.moe.num_experts if args.moe else 1
    return args.n_layers * (2 * args.dim * q + 2 * args.dim * k + 3 * args.dim * args.hidden_dim * experts)


def other_parameters(args: ModelArgs) -> int:
    """Embeddings, head, norms and the MoE router: always in the compute dtype."""
    router = args.moe.num_experts * args.dim if args.moe else 0
    return 2 * args.vocab_size * args.dim + args.dim + args.n_layers * (2 * args.dim + router)


def lora_parameters(args: ModelArgs, cfg: TrainConfig) -> int:
    """The LoRA parameters of `cfg.lora`'s targets and rank on this model, DoRA's magnitudes included."""
    q, k = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    experts = args.moe.num_experts if args.moe else 1
    shapes = {  # (in, out) of each target, and how many a layer has
        "wq": (args.dim, q, 1),
        "wk": (args.dim, k, 1),
        "wv": (args.dim, k, 1),
        "wo": (q, args.dim, 1),
        "w1": (args.dim, args.hidden_dim, experts),
        "w3": (args.dim, args.hidden_dim, experts),
        "w2": (args.hidden_dim, args.dim, experts),
    }
    r = cfg.lora.rank
    magnitudes = 1 if cfg.lora.dora else 0  # DoRA's, one per output row
    per_layer = sum((r * (i + o) + magnitudes * o) * n for t, (i, o, n) in shapes.items() if t in cfg.lora.targets)
    head = r * (args.dim + args.vocab_size) if "output" in cfg.lora.targets else 0
    return args.n_layers * per_layer + head


def estimate_memory(args: ModelArgs, cfg: TrainConfig, world_size: int, value_bytes: int) -> MemoryEstimate:
    """Estimate the peak bytes per GPU by the module docstring's formulas.

    Args:
        world_size: the ranks FSDP shards over (W).
        value_bytes: bytes per value of the compute dtype (b): 2 for bf16 and fp16, 4 for fp32.
    """
    b = value_bytes
    d, h, L, V = args.dim, args.hidden_dim, args.n_layers, args.vocab_size
    q, k = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    n = cfg.seq_len * cfg.batch_size

    proj_bytes = projection_parameters(args) * (NF4_BITS_PER_WEIGHT / 8 if cfg.model.quantize == "nf4" else b)
    rest_bytes = other_parameters(args) * b
    weights = (proj_bytes + rest_bytes) / world_size
    if world_size > 1:
        gathered_blocks = min(L, 1 + cfg.model.fsdp_prefetch)
        weights += gathered_blocks * proj_bytes / L + rest_bytes

    lora = lora_parameters(args, cfg) * LORA_BYTES_PER_PARAMETER / world_size

    a_attn = (4 + 2 * b) * d + b * (q + 2 * k) + (4 + b) * (q + k) + b * q
    a_mlp = ((4 + 2 * b) * d + 4 * b * h) * (args.moe.num_experts_per_tok if args.moe else 1)
    kept = d * b  # a block's input
    if not cfg.model.activation_checkpointing:
        activations = L * n * (a_attn + a_mlp)
    elif cfg.model.checkpointing_scope == "mlp":
        activations = L * n * (kept + a_attn) + n * a_mlp
    else:
        activations = L * n * kept + n * (a_attn + a_mlp)

    loss = min(n, DEFAULT_CHUNK_SIZE) * V * (b + (0 if b == 4 else 4) + 4)
    return MemoryEstimate(weights, lora, activations, loss)


def fits(estimate: MemoryEstimate, gpu_bytes: float) -> bool:
    """Whether the estimate fits a GPU of `gpu_bytes`, HEADROOM of it kept free."""
    return estimate.total <= (1 - HEADROOM) * gpu_bytes


def first_change(cfg: TrainConfig, estimate: MemoryEstimate, gpu_bytes: float) -> str:
    """The setting to change first when the estimate does not fit a GPU of `gpu_bytes`, in words.

    The one that frees the most, in the order a user would give up least: checkpointing, then 4-bit weights, then
    shorter sequences.
    """
    budget = (1 - HEADROOM) * gpu_bytes
    if not cfg.model.activation_checkpointing or cfg.model.checkpointing_scope == "mlp":
        return "model.activation_checkpointing: true with model.checkpointing_scope: block"
    if cfg.model.quantize == "none" and estimate.weights > estimate.total - budget:
        return 'model.quantize: nf4 (4-bit frozen weights, pip install -e ".[qlora]")'
    if cfg.batch_size > 1:
        return "batch_size: 1 with a higher grad_accumulation (the same batch in more micro-batches)"
    if estimate.activations + estimate.loss > estimate.total - budget:
        return f"a lower seq_len (activations grow with it; {cfg.seq_len} now)"
    return "more GPUs (FSDP shards the weights over them)"


def fit_report(cfg: TrainConfig, estimate: MemoryEstimate, gpu_bytes: float, where: str) -> str:
    """One line: the estimate, and whether it fits `where` (a GPU of gpu_bytes), with the setting to change first."""
    if fits(estimate, gpu_bytes):
        return f"memory: {estimate.summary()}: fits {where} ({gpu_bytes / GIB:.3g} GiB, 10% kept free)"
    return (
        f"memory: {estimate.summary()}: does NOT fit {where} ({gpu_bytes / GIB:.3g} GiB, 10% kept free); "
        f"change first: {first_change(cfg, estimate, gpu_bytes)}"
    )


def config_estimate(cfg: TrainConfig, world_size: int) -> MemoryEstimate:
    """The estimate for a run of `cfg` on `world_size` GPUs, from the model folder's params (no weights read)."""
    return estimate_memory(load_model_args(cfg.model.path), cfg, world_size, VALUE_BYTES[cfg.model.dtype])
