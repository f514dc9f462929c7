"""One step over micro-batches and ranks: token-weighted loss, the same numbers on 1 or 2 ranks, only adapters move,
and nothing read back from the device."""

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, free_port, subprocess_env
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.config import load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.training.distributed import DistInfo
from finetune.training.loss import loss_inputs
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer
from finetune.training.parallel import compile_note, enable_activation_checkpointing, prefetch_plan
from finetune.training.train_step import train_step
from model.args import load_model_args

WORKER = Path(__file__).with_name("step_worker.py")


def run_worker(config: Path, out: Path, ranks: int) -> dict:
    launcher = (
        []
        if ranks == 1
        else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port())]
    )
    result = subprocess.run(
        [sys.executable, *launcher, str(WORKER), str(config), str(out)],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return torch.load(out, weights_only=True)


def test_one_and_two_ranks_give_the_same_losses_and_adapters(write_config, tmp_path):
    config = write_config(optim__lr=1e-3)
    one = run_worker(config, tmp_path / "one.pt", ranks=1)
    two = run_worker(config, tmp_path / "two.pt", ranks=2)
    assert one["losses"][0] > 9.0 and one["losses"][2] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-4, atol=1e-5)
    assert one["adapters"].keys() == two["adapters"].keys()
    for name, tensor in one["adapters"].items():
        torch.testing.assert_close(two["adapters"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("layers.1.ffn_norm.weight"), "missing tensor(s) ['layers.1.ffn_norm.weight']"),
        (
            lambda s: s.update({"layers.0.attention.wk.weight": torch.zeros(3, 64)}),
            "tensor 'layers.0.attention.wk.weight' has shape (3, 64), the model's params expect (32, 64)",
        ),
    ],
)
def test_the_training_model_checks_its_weights_as_load_model_does(edit, words, write_config, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(bad / "consolidated.safetensors")
    edit(state)
    save_file(state, bad / "consolidated.safetensors")
    cfg = load_config(write_config(model__path=str(bad)))
    with pytest.raises(ValueError) as err:
        build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, torch.device("cpu")))
    assert words in str(err.value) and str(bad) in str(err.value)


def test_step_loss_is_token_weighted_and_only_adapters_change(write_config):
    cfg = load_config(write_config())
    tokenizer = load_tokenizer(cfg.model.path)
    batches = build_eval_batches(
        open_run_data(cfg.data, tokenizer, cache_dir=Path(cfg.data.cache_dir)),
        seq_len=cfg.seq_len,
        batch_size=1,
        rank=0,
        world_size=1,
    )[:2]
    batches[1].weights[batches[1].weights > 0] *= 0.5  # unequal weights tell a token mean from a mean of means
    device = torch.device("cpu")
    model = build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, device))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    with torch.no_grad():
        per_batch = [model(**loss_inputs(b, device)) for b in batches]
    expected = sum(s.loss_sum for s in per_batch) / sum(s.weight_sum for s in per_batch)

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    sums = train_step(model, optimizer, batches, device, max_grad_norm=1.0, world_size=1)
    assert sums.tokens == 2 * cfg.seq_len
    outcome = sums.outcome()
    assert outcome.trained_tokens == sum(int((b.weights > 0).sum()) for b in batches)
    assert outcome.finite and not outcome.stop_requested
    assert outcome.loss == pytest.approx(expected.item(), rel=1e-6)
    assert outcome.grad_norm > 0  # before clipping; test_one_and_two_ranks_... checks its value against 2 ranks'

    # B starts at zero, so the first step moves every B and (without weight decay) nothing else, A included.
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.endswith("lora_B.weight")}
    assert len(changed) == 2 * 7 + 1


def test_activation_checkpointing_changes_memory_not_numbers(write_config):
    """No checkpointing, whole blocks recomputed, or only the feed-forward: the same loss and gradients."""
    results = []
    for overrides in (
        dict(model__activation_checkpointing=False),
        dict(model__checkpointing_scope="block"),
        dict(model__checkpointing_scope="mlp"),
    ):
        cfg = load_config(write_config(**overrides))
        tokenizer = load_tokenizer(cfg.model.path)
        batch = build_eval_batches(
            open_run_data(cfg.data, tokenizer, cache_dir=Path(cfg.data.cache_dir)),
            seq_len=cfg.seq_len,
            batch_size=1,
            rank=0,
            world_size=1,
        )[0]
        model = build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, torch.device("cpu")))
        model.model.layers[0].attention.wq.lora_B.weight.data.fill_(0.01)  # so that every LoRA A gets a gradient
        sums = model(**loss_inputs(batch, torch.device("cpu")))
        sums.loss_sum.backward()
        results.append((sums.loss_sum.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-6, atol=1e-7, msg=name)


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for a GPU: reading a value (.item(), bool(), int(), .tolist())."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append("item")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads = self.reads

        def tolist(tensor):
            reads.append("tolist")
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def three_steps(cfg, device: torch.device, check):
    batches = build_eval_batches(
        open_run_data(cfg.data, load_tokenizer(cfg.model.path), cache_dir=Path(cfg.data.cache_dir)),
        seq_len=cfg.seq_len,
        batch_size=1,
        rank=0,
        world_size=1,
    )[:3]
    model = build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, device))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    results = [train_step(model, optimizer, batches[:1], device, max_grad_norm=1.0, world_size=1)]  # warm up
    with check():
        results += [
            train_step(model, optimizer, batches[1:], device, max_grad_norm=1.0, world_size=1) for _ in range(2)
        ]
    return batches, results


def test_a_step_reads_nothing_back_from_the_device(write_config):
    """`.item()` belongs to log steps: a step leaves its outcome on the way to the host and returns."""
    cfg = load_config(write_config())
    counter = HostReads()
    batches, results = three_steps(cfg, torch.device("cpu"), lambda: counter)
    assert counter.reads == []
    trained = sum(int((b.weights > 0).sum()) for b in batches[1:])
    assert [(s.outcome().finite, s.outcome().stop_requested, s.outcome().trained_tokens) for s in results[1:]] == [
        (True, False, trained)
    ] * 2
    assert counter.reads == []  # the outcome is read outside the counted steps
    assert results[2].outcome().loss < results[1].outcome().loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, attention", [("fp32", "sdpa"), ("bf16", "auto")])
def test_a_step_never_waits_for_the_gpu(write_config, dtype, attention):
    """CUDA's own check: any synchronisation (a value read, a blocking copy, nonzero on the GPU) raises."""
    cfg = load_config(write_config(model__dtype=dtype, model__attention=attention))

    @contextlib.contextmanager
    def no_sync():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    _, results = three_steps(cfg, torch.device("cuda"), no_sync)
    assert all(s.outcome().finite for s in results)


def test_compiled_blocks_give_the_eager_numbers_and_compile_once(write_config):
    """torch.compile of every block (inductor, on CPU here) with checkpointing: the eager losses, and batches of
    other document lengths run the compiled code without compiling again."""
    eager = three_steps(load_config(write_config()), torch.device("cpu"), contextlib.nullcontext)[1]
    try:
        compiled = three_steps(
            load_config(write_config(model__compile=True)),
            torch.device("cpu"),
            lambda: torch.compiler.set_stance("fail_on_recompile"),
        )[1]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(
        torch.tensor([s.outcome().loss for s in compiled]),
        torch.tensor([s.outcome().loss for s in eager]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_compiled_blocks_under_fsdp2_with_deeper_prefetch_match_one_process(write_config, tmp_path):
    config = write_config(optim__lr=1e-3)
    one = run_worker(config, tmp_path / "one.pt", ranks=1)
    config = write_config(optim__lr=1e-3, model__compile=True, model__fsdp_prefetch=2)
    two = run_worker(config, tmp_path / "two.pt", ranks=2)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-4, atol=1e-5)
    for name, tensor in one["adapters"].items():
        torch.testing.assert_close(two["adapters"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def test_the_prefetch_plan_gathers_the_next_blocks_in_forward_and_the_previous_ones_in_backward():
    assert prefetch_plan(4, 1) == [([1], []), ([2], [0]), ([3], [1]), ([], [2])]
    assert prefetch_plan(5, 2) == [([1, 2], []), ([2, 3], [0]), ([3, 4], [1, 0]), ([4], [2, 1]), ([], [3, 2])]
    assert prefetch_plan(2, 3) == [([1], []), ([], [0])]


def test_bf16_like_on_gpus_one_process_and_two_fsdp2_ranks_follow_the_fp32_run(write_config, tmp_path):
    """The GPU dtype on CPU: frozen weights and compute in bf16, LoRA weights and AdamW in fp32 (cast for compute in
    one process, by FSDP2's mixed precision on two ranks): the fp32 run's losses, and its adapter updates up to
    bf16's rounding (Adam moves each weight by about lr a step, whatever its gradient's size, so a tiny gradient
    that flips sign moves a weight the other way: hence a bound of 2 lr a step on any weight, and a direction test)."""
    lr, steps = 1e-3, 3
    fp32 = run_worker(write_config(optim__lr=lr), tmp_path / "fp32.pt", ranks=1)
    one = run_worker(write_config(optim__lr=lr, model__dtype="bf16"), tmp_path / "one.pt", ranks=1)
    two = run_worker(write_config(optim__lr=lr, model__dtype="bf16"), tmp_path / "two.pt", ranks=2)
    for run in (one, two):
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(fp32["losses"]), rtol=1e-3, atol=0)
        for name, expected in fp32["adapters"].items():
            got = run["adapters"][name]
            assert got.dtype == torch.float32, name
            assert (got - expected).abs().max() <= 2 * lr * steps, name
            if "lora_B" in name:  # B starts at zero: its value is the update
                assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.98, name
                assert (got - expected).norm() < 0.2 * expected.norm(), name
    assert one["losses"][2] < one["losses"][0] - 0.1


def test_importing_train_loads_no_fsdp_nor_distributed_checkpoint():
    """FSDP, torch.distributed.tensor (which loads sympy) and torch.distributed.checkpoint cost train.py about three
    seconds of start-up that a run on one device, or `tailor validate`, never needs: they are imported where a run
    with several ranks shards the model, or where a checkpoint is saved or resumed."""
    heavy = ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint", "sympy")
    code = f"import sys, train, finetune.cli\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_a_compiled_mixtral_block_under_checkpointing_compiles_nothing_and_the_run_says_so(write_config):
    """Dynamo stops at the experts' token counts (a host read) inside the checkpointed block, which then runs eagerly
    whole: no graph is made. The run's report says so before step 1; a dense model's says nothing."""
    from torch._dynamo.utils import counters

    from model.attention import DocumentMask
    from model.tiny import tiny_args
    from model.transformer import TransformerBlock, document_positions, rotary_table

    args = tiny_args("mixtral-8x7b", 1000)
    block = TransformerBlock(args)
    enable_activation_checkpointing(block)
    block.compile()
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(16, args.dim, requires_grad=True)
    rope = rotary_table(document_positions([16], "cpu"), args.head_dim, args.rope_theta)
    block(x, rope, DocumentMask([16], "sdpa", None, torch.device("cpu"))).sum().backward()
    assert counters["stats"]["unique_graphs"] == 0
    torch._dynamo.reset()

    cfg = load_config(write_config(model__compile=True))
    assert "compiles nothing here" in compile_note(cfg.model, args)
    assert compile_note(cfg.model, tiny_args("mistral-7b", 1000)) is None
    cfg.model.activation_checkpointing = False
    assert compile_note(cfg.model, args) is None
