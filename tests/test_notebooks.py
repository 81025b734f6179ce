"""The notebooks, executed top to bottom as a user runs them, with small parameters.

Each notebook has one code cell tagged ``parameters``; as papermill does, the tests insert
a cell after it that overrides some of them (``E4T_JAX_SOURCE`` is this checkout, so the
install cell finds e4t-jax importable and installs nothing). The kernel is a subprocess
with this process's environment (conftest's temporary ``E4T_HOME`` / ``E4T_CACHE_DIR``,
CPU, offline), plus ``PYTHONPATH`` at this checkout and ``XLA_FLAGS``: XLA's CPU backend
at optimization level 0 (it compiles ~1.5x faster, and these runs take a few steps), and
for pre-training 4 simulated CPU devices. Each notebook saves its figures as PNG files in
the ``OUT`` folder that the test passes in.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("personalize", "pretrain_tpu", "extending")
COLAB = "https://colab.research.google.com/github/{}/blob/main/notebooks/{}.ipynb"


def _repository_url() -> str:
    """setup.py's ``URL``: the one place the repository address is defined."""
    return re.search(r'^URL = "([^"]+)"$', (ROOT / "setup.py").read_text(), re.M).group(1)


def _cells(name: str) -> list[dict]:
    return json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _install_cell(cells: list[dict]) -> str:
    return next(_source(c) for c in cells if c["cell_type"] == "code" and "def jax_requirement" in _source(c))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    code = [cell for cell in _cells(name) if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_installs_from_the_repository_and_opens_from_it_on_colab(name):
    url = _repository_url()
    assert url.startswith("https://github.com/") and url.count("/") == 4
    owner_repo = url.removeprefix("https://github.com/")
    cells = _cells(name)
    assert COLAB.format(owner_repo, name) in _source(cells[0])  # the badge, at the top
    parameters = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1 and f'E4T_JAX_SOURCE = "git+{url}"' in _source(parameters[0])
    assert COLAB.format(owner_repo, name) in (ROOT / "README.md").read_text()
    assert _install_cell(cells) == _install_cell(_cells(NOTEBOOKS[0]))  # one install cell for all


def test_install_cell_stops_in_one_line_while_the_repository_is_a_placeholder(tmp_path):
    """Where e4t-jax is not importable and the source is still the placeholder, the install
    cell says so and stops (a bare interpreter: ``-I -S``, no site-packages)."""
    program = 'E4T_JAX_SOURCE = "git+https://github.com/OWNER/e4t-jax"\n' + _install_cell(_cells(NOTEBOOKS[0]))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "E4T_JAX_SOURCE is a placeholder: set it to e4t-jax's repository (git+https://...) or a local clone, "
        "then run this cell again"]


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"executing the notebooks needs {', '.join(missing)}: pip install -e '.[test]'", pytrace=False)


def execute(name: str, workdir: Path, parameters: dict, xla_flags: tuple[str, ...] = ()):
    """Runs ``notebooks/NAME.ipynb`` in ``workdir`` with ``parameters`` injected; returns it executed."""
    _require("nbformat", "nbclient", "ipykernel", "matplotlib")
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    flags = [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", *xla_flags]
    kernel_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                  "XLA_FLAGS": " ".join(filter(None, flags))}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env)
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"a cell of {name}.ipynb failed:\n{error}", pytrace=False)
    print(f"{name}.ipynb ran in {time.perf_counter() - start:.0f}s")
    return nb


def _text(nb) -> str:
    """Everything the cells printed (stdout and stderr)."""
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def _errors(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]


def assert_figure(path: Path, min_side: int = 100) -> None:
    """A real picture: big enough, and not one flat colour."""
    assert path.is_file(), path
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert min(pixels.shape[:2]) >= min_side and pixels.std() > 5, (path, pixels.shape, pixels.std())


def assert_installed_nothing(nb) -> None:
    """The install cell chose plain ``jax`` (CPU) and this checkout, and found e4t-jax importable."""
    text = _text(nb)
    assert "e4t-jax is already importable; not running:" in text
    assert f"install -q -U jax {ROOT}" in text and "devices: [CpuDevice(id=0)" in text


# ---------------------------------------------------------------------------- personalize


@pytest.fixture(scope="module")
def personalized(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("personalize")
    nb = execute("personalize", workdir, {"E4T_JAX_SOURCE": str(ROOT), "OUT": "out", "STEPS": 3, "BATCH_SIZE": 2,
                                          "SAMPLE_STEPS": 10})
    return nb, workdir / "out"


def test_personalize_notebook(personalized):
    from e4t_jax.e4t import concept as concept_lib

    nb, out = personalized
    assert not _errors(nb)
    assert_installed_nothing(nb)
    assert "skipped: set REAL_SD = True" in _text(nb)  # the real-model section stays off
    _, header = concept_lib.read_concept(out / "concept.safetensors")
    assert header["config"]["model"]["domain_word"] == "digit" and header["run"]["steps"] == 3
    assert len(list((out / "images").glob("0*.png"))) == 5
    assert_figure(out / "personalization.png")
    for name in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors", "README.md"):
        assert (out / "concept-diffusers" / name).is_file(), name


# -------------------------------------------------------------------------- pre-training


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny preset on 4 simulated CPU devices: 2 steps, then resumed to 4."""
    workdir = tmp_path_factory.mktemp("pretrain")
    nb = execute("pretrain_tpu", workdir,
                 {"E4T_JAX_SOURCE": str(ROOT), "PRESET": "tiny", "RENDERS": 1, "STEPS": 4, "BATCH_SIZE": 4,
                  "RUN": "run", "CHECKPOINTS": "checkpoints", "SAVE_EVERY": 2, "LOG_EVERY": 1, "SAMPLE_EVERY": 0,
                  "TENSORBOARD": False, "OUT": "out"},
                 xla_flags=("--xla_force_host_platform_device_count=4",))
    return nb, workdir


def test_pretrain_notebook_splits_the_batch_over_4_devices_and_resumes(pretrained):
    nb, workdir = pretrained
    assert not _errors(nb)
    text = _text(nb)
    assert "devices: [CpuDevice(id=0), CpuDevice(id=1), CpuDevice(id=2), CpuDevice(id=3)]" in text
    assert "4 devices, mesh {'data': 4, 'fsdp': 1}; 1 examples each" in text
    assert "resumed from step 2" in text and "TensorBoard not shown" in text
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (workdir / "checkpoints" / "4").is_dir() and not (workdir / "run" / "checkpoints").exists()
    config = json.loads((workdir / "run" / "encoder-files" / "encoder.json").read_text())
    assert config["pretrained_steps"] == 4
    assert_figure(workdir / "out" / "loss.png")


# ----------------------------------------------------------------------------- extending


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("extending")
    nb = execute("extending", workdir, {"E4T_JAX_SOURCE": str(ROOT), "STEPS": 6, "BATCH_SIZE": 2, "OUT": "out"})
    return nb, workdir / "out"


def test_extending_notebook_registers_a_kind_and_a_backbone_and_plots_their_curves(extended):
    nb, out = extended
    assert not _errors(nb)
    text = _text(nb)
    assert "identical to the base U-Net: True" in text
    for variant in ("low-rank offsets, all patches", "rotation offsets, all patches", "low-rank offsets, 2x2 grid"):
        assert f"{variant}: diffusion loss" in text
    assert_figure(out / "loss_curves.png")
