"""benchmarks/gpu_run.sh is wired for its one GPU call: the gpu tests collect with only what the GPU image holds and
the wheels the script carries, and every part's command runs, at tiny sizes on this CPU (GPU_RUN_DRY=1)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"
PARTS = ("tests", "7b", "long", "nemo", "nf4", "profile")

# The GPU machine's Python packages, as /work/.library/device/KINDS.md of the workplace listed them on 2026-11-17
# (the image 'cuda'); what is missing there travels as the wheels named in gpu_run.sh's WHEELS.
GPU_IMAGE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()

# Run in a fresh interpreter: every import of a top-level module that an installed distribution outside `allowed`
# provides fails, as on the GPU machine; then pytest collects the gpu tests.
COLLECT_AS_ON_THE_GPU_MACHINE = """
import importlib.metadata, re, sys
from pathlib import Path
allowed, repo = set(sys.argv[1].split()), Path.cwd()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
providers = importlib.metadata.packages_distributions()
blocked = set()

def local(top):  # the repository's own packages and the tests' helper modules
    folders = [Path(p).resolve() for p in sys.path if p and Path(p).resolve().is_relative_to(repo)]
    return any((f / top).is_dir() or (f / f"{top}.py").is_file() for f in folders)

class GpuImage:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = providers.get(top)
        if top in sys.stdlib_module_names or not dists or any(norm(d) in allowed for d in dists) or local(top):
            return None
        blocked.add(top)
        raise ModuleNotFoundError(f"No module named {top!r} (not on the GPU machine)", name=top)

sys.meta_path.insert(0, GpuImage())
import pytest
status = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
print("blocked:", " ".join(sorted(blocked)))
sys.exit(status)
"""


def carried_wheels() -> list[str]:
    """The distributions gpu_run.sh downloads and installs, from its WHEELS line."""
    line = re.search(r'^WHEELS="([^"]+)"', SCRIPT.read_text(), re.MULTILINE).group(1)
    return [spec.partition("==")[0] for spec in line.split()]


def test_the_gpu_tests_collect_with_only_the_gpu_images_packages_and_the_carried_wheels():
    allowed = {re.sub(r"[-_.]+", "-", name).lower() for name in GPU_IMAGE_PACKAGES + carried_wheels()}
    result = subprocess.run(
        [sys.executable, "-c", COLLECT_AS_ON_THE_GPU_MACHINE, " ".join(sorted(allowed))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = re.search(r"^(\d+)/\d+ tests collected", result.stdout, re.MULTILINE)
    assert collected and int(collected.group(1)) >= 11, result.stdout[-2000:]
    # the simulation bites: the notebook's runner, installed here, was refused, and its tests skipped at collection
    assert "nbformat" in result.stdout.rpartition("blocked:")[2].split()


def test_the_wheels_carry_what_the_product_and_the_tests_need_beyond_the_image():
    assert {"mistral-common", "torchao"} <= set(carried_wheels())
    assert not {re.sub(r"[-_.]+", "-", w).lower() for w in carried_wheels()} & set(GPU_IMAGE_PACKAGES)


@pytest.mark.slow
def test_every_part_of_the_gpu_run_runs_in_its_dry_mode(tmp_path):
    """One call: each part under its limit, its output in OUT/PART.txt as it goes, its status in summary.txt; the
    7b part measures tailor and HF + PEFT both ways, with MFU in model and hardware FLOPs,
    the estimate and the trace."""
    pytest.importorskip("transformers", reason="the baseline is transformers + PEFT (the dev extra)")
    pytest.importorskip("peft", reason="the baseline is transformers + PEFT (the dev extra)")
    pytest.importorskip("torchao", reason="the nf4 part needs the qlora extra")
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GPU_RUN_DRY="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for part in PARTS:
        assert re.search(rf"^part {part}: exit 0 after \d+ s$", summary, re.MULTILINE), summary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{p}.txt" for p in PARTS] + ["summary.txt"])
    assert re.search(r"\d+ skipped", (tmp_path / "tests.txt").read_text())  # no CUDA here: collected, then skipped
    b7 = (tmp_path / "7b.txt").read_text()
    for side in ("tailor", "transformers\\+peft default", "transformers\\+peft equal"):
        assert re.search(
            rf"{side}: [\d,]+ tokens/s per GPU  MFU .*\(model FLOPs\), .*\(hardware FLOPs\)  peak memory", b7
        ), b7
    assert re.search(r"tailor / HF default: \d+\.\d+x tokens/s", b7)
    assert re.search(r"tailor / HF equal: \d+\.\d+x tokens/s", b7)
    assert "memory estimate of tailor's setup: about" in b7
    assert re.search(r"trace of tailor's setup: trace \(as on h100: float32, attention \w+\): frozen weights", b7)
    assert "trace of tailor's setup: trace (as on h100: float32" in (tmp_path / "nf4.txt").read_text()
    assert "tailor nf4:" in (tmp_path / "nf4.txt").read_text()
    assert "profile of one tailor step" in (tmp_path / "profile.txt").read_text()
