"""model.path as a Hugging Face hub id, resolved in a cache laid out as the hub lays it out (blobs, snapshots/HASH,
refs/main), offline: nothing is downloaded. A folder of the same name wins; what cannot be had is a line in words."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml
from launching import REPO, subprocess_env

from finetune.config import load_config
from finetune.training.model_hub import files_to_download, is_hub_id, resolve_hub_model
from finetune.training.preflight import PreflightError

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# the files of mistralai/Mistral-7B-Instruct-v0.3 (both layouts) and of a Hugging Face only repository
MISTRAL_7B_V03 = [
    ".gitattributes",
    "README.md",
    "config.json",
    "consolidated.safetensors",
    "generation_config.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "model.safetensors.index.json",
    "params.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer.model.v3",
    "tokenizer_config.json",
]
HF_ONLY = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
           "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]  # fmt: skip


def hub_cache(cache, repo_id: str, model_dir) -> None:
    """The hub's layout of a downloaded repository: each file a blob named by its hash, linked from
    snapshots/COMMIT/, and refs/main naming COMMIT."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


def offline(cache, **extra) -> dict:
    return subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_TOKEN="", **extra)


def test_files_to_download_are_the_native_ones_when_the_repository_has_them():
    assert files_to_download(MISTRAL_7B_V03) == ["params.json", "consolidated*.safetensors", "tokenizer.model.v*",
                                                 "*.model.v*"]  # fmt: skip
    assert files_to_download(HF_ONLY) == [
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
    assert files_to_download(["params.json", "consolidated.safetensors", "tekken.json"])[-1] == "tekken*.json"


def test_a_hub_id_trains_from_the_hub_cache_offline_and_is_recorded(write_config, tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "mistralai/Tiny-v0.1", tiny_model_dir)
    config = write_config(max_steps=2, eval__enabled=False, model__path="mistralai/Tiny-v0.1")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "train", str(config)],
        cwd=tmp_path,
        env=offline(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    snapshot = cache / "models--mistralai--Tiny-v0.1" / "snapshots" / COMMIT
    assert (recorded["path"], recorded["hub_id"]) == (str(snapshot), "mistralai/Tiny-v0.1")

    # validate reads the same folder; the same command resumes with the settings unchanged
    validated = subprocess.run(
        [sys.executable, "-m", "finetune", "validate", str(config)],
        cwd=tmp_path,
        env=offline(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert validated.returncode == 0, validated.stderr
    again = subprocess.run(
        [sys.executable, "train.py", str(config), "max_steps=3"],
        cwd=REPO,
        env=offline(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "settings changed from" in again.stdout and "model." not in again.stdout.split("settings changed")[1]


def test_a_hub_id_not_in_the_cache_offline_is_an_error_in_words(write_config, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    config = write_config(model__path="mistralai/Absent-v1")
    for command in (["-m", "finetune", "train", str(config)], ["-m", "finetune", "validate", str(config)]):
        result = subprocess.run(
            [sys.executable, *command], cwd=tmp_path, env=offline(cache), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 2
        assert result.stderr == (
            "error: model.path: mistralai/Absent-v1 (a Hugging Face hub id; no folder of that name here): not in the "
            f"hub's cache ({cache}), and HF_HUB_OFFLINE is set; download it once with a network, or point model.path "
            "at a model folder\n"
        )
    assert not (tmp_path / "run").exists()


def test_a_folder_of_the_same_name_wins(write_config, tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "mistralai").mkdir()
    (tmp_path / "mistralai" / "Tiny-v0.1").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the hub is never asked
    cfg = load_config(write_config(model__path="mistralai/Tiny-v0.1"))
    assert resolve_hub_model(cfg) is cfg


def test_a_hub_id_without_huggingface_hub_names_the_extra(write_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    cfg = load_config(write_config(model__path="mistralai/Tiny-v0.1"))
    with pytest.raises(PreflightError, match=r'needs huggingface_hub: pip install "tailor\[hub\]"'):
        resolve_hub_model(cfg)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated repository or one it does not have (X-Error-Code)."""

    def do_GET(self):
        gated = "Gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "gated" if gated else "Repository not found"}).encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("repo_id", "said"),
    [
        ("mistralai/Gated-v1", "the repository is gated; accept its conditions at https://huggingface.co/"),
        ("mistralai/Unknown-v1", "the hub has no such repository, or it is private (then set HF_TOKEN"),
    ],
)
def test_gated_and_unknown_repositories_are_errors_in_words(write_config, tmp_path, repo_id, said):
    """The real client against a server on this machine that answers as the hub does: nothing leaves the machine."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = subprocess_env(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_CACHE=str(tmp_path / "hub"))
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run(
            [sys.executable, "-m", "finetune", "validate", str(write_config(model__path=repo_id))],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert result.returncode == 2
    where = f"error: model.path: {repo_id} (a Hugging Face hub id; no folder of that name here): "
    assert result.stderr.startswith(where + said)
    assert result.stderr.count("\n") == 1


def test_what_reads_as_a_hub_id_and_what_as_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("mistralai/Mistral-7B-Instruct-v0.3")
    assert not is_hub_id("./models/mistral-7b-v0.3")  # the shipped configs' form: always a folder
    assert not is_hub_id("/models/mistral-7b") and not is_hub_id("models/a/b")
    assert is_hub_id("models/mistral-7b-v0.3")  # no models/ here: it could be a repository
    (tmp_path / "models").mkdir()
    assert not is_hub_id("models/mistral-7b-v0.3")  # a folder of models without this one: a missing folder


def test_a_shipped_config_without_its_model_is_a_missing_folder_at_once(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "validate", str(REPO / "configs" / "mistral-7b-v0.3.yaml")],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: model.path: models/mistral-7b-v0.3 is not a folder" in result.stderr
    assert "Retrying" not in result.stderr and "hub" not in result.stderr
