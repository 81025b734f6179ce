"""Executes notebooks/personalize.ipynb on the tiny model, as a user would run it top to bottom.

The kernel is a subprocess: it inherits this process's environment, which conftest
has already pointed at the per-session temporary E4T_HOME / E4T_CACHE_DIR (CPU, offline).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "personalize.ipynb"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"executing the notebook needs {', '.join(missing)}: pip install -e '.[test]'", pytrace=False)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``(notebook after execution, its working folder)``."""
    _require("nbformat", "nbclient", "ipykernel")
    import nbclient
    import nbformat

    workdir = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"a notebook cell failed:\n{error}", pytrace=False)
    return nb, workdir


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


def test_notebook_runs_without_errors(executed):
    nb, _ = executed
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) == 3  # the input photo, the preview grid, the generated grid


def test_notebook_writes_concept_grids_and_export(executed):
    from e4t_jax.e4t import concept as concept_lib

    _, workdir = executed
    _, header = concept_lib.read_concept(workdir / "concept.safetensors")
    assert header["config"]["model"]["placeholder"] == "S*" and header["config"]["model"]["domain_word"] == "face"
    preview = np.asarray(Image.open(workdir / "preview.png"))
    grid = np.asarray(Image.open(workdir / "grid.png"))
    assert preview.shape == (128, 192, 3) and grid.shape == (128, 128, 3)  # 5 and 4 tiles of 64x64
    exported = workdir / "concept-diffusers"
    for name in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "e4t_concept.json", "README.md"):
        assert (exported / name).is_file(), name
