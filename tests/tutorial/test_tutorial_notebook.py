"""The tutorial notebook runs end to end, headless, in its tiny mode: it leaves a checkpoint, a plot, an answer
and the merged and exported models, all under its work folder."""

import json
import os
from pathlib import Path

import pytest

# the notebook's runner (the dev extra): absent on the GPU machine, where `pytest -m gpu tests` must still collect
nbformat = pytest.importorskip("nbformat", reason="running the notebook needs nbformat and nbclient (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="running the notebook needs nbformat and nbclient (the dev extra)")
from nbclient.exceptions import CellExecutionError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "tutorials" / "finetune_mistral_7b.ipynb"


def test_notebook_is_stored_without_outputs_and_has_a_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the notebook's outputs"
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "TINY_DEMO = " in code[0].source


def test_notebook_runs_in_tiny_mode(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("TAILOR_TUTORIAL_TINY", "1")
    monkeypatch.setenv("TAILOR_TUTORIAL_WORK_DIR", str(work))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matmuls: a second thread only costs wake-ups (tests/conftest.py)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "print(json.dumps({'checkpoint': str(checkpoint), 'plot': str(plot_path), 'answer': answer,"
            " 'base_answer': base_answer}))"
        )
    )
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises at a failing cell

    produced = json.loads(notebook.cells[-1].outputs[0]["text"])
    assert (Path(produced["checkpoint"]) / "lora.safetensors").is_file()
    assert Path(produced["checkpoint"]).is_relative_to(work)
    assert Path(produced["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the demo's template ("Good night, Alice!"), learned in 40 steps; the random base model answers anything else
    assert produced["answer"].startswith("Good "), produced
    assert not produced["base_answer"].startswith("Good "), produced
    assert (work / "merged" / "consolidated.safetensors").is_file()
    assert (work / "merged-hf" / "config.json").is_file()
    assert (work / "adapter-peft" / "adapter_config.json").is_file()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot is not displayed in the notebook"
    assert any(f"plot the curves: tailor plot {work}" in o.get("text", "") for o in outputs), "training names the plot"


def test_without_tailor_installed_the_install_cell_asks_for_its_source(tmp_path, monkeypatch):
    """Opened in Colab as it is: no placeholder URL is cloned; the first step names the parameter to set."""
    monkeypatch.setenv("TAILOR_TUTORIAL_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("TAILOR_SOURCE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert "YOUR-ORG" not in json.dumps(notebook)
    parameters, install = [cell for cell in notebook.cells if cell.cell_type == "code"][:2]
    assert "TAILOR_SOURCE = " in parameters.source
    blocked = nbformat.v4.new_code_cell("import sys\nsys.modules['finetune'] = None  # as in a fresh Colab kernel")
    notebook.cells = [blocked, parameters, install]
    with pytest.raises(CellExecutionError) as error:
        nbclient.NotebookClient(
            notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    assert "set TAILOR_SOURCE in the first cell to tailor's git URL" in str(error.value)
    assert not (tmp_path / "tailor").exists()  # nothing was cloned
