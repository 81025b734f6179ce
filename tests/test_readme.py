"""The README's snippets run as they are, on the embedded tiny model.

Every Python block runs on its own (in a fresh namespace: it must import what it uses),
in one fresh process, in order. Every command of the bash blocks parses with its
program's options, and the blocks that use the tiny model run, command by command,
in-process.
"""
import importlib
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROGRAMS = {"e4t-generate": "infer.generate", "e4t-personalize": "infer.personalize", "e4t-export": "infer.export",
            "e4t-demo": "infer.demo", "e4t-pretrain": "train.pretrain_encoder",
            "e4t-ti": "train.textual_inversion", "e4t-dreambooth": "train.dreambooth",
            "bench/compare_methods.py": "bench.compare_methods"}

RUNNER = textwrap.dedent("""
    import sys
    blocks = [open(path).read() for path in sys.argv[1:]]
    spaces = []
    for i, block in enumerate(blocks):
        spaces.append({"__name__": "__main__"})
        exec(compile(block, f"README python block {i + 1}", "exec"), spaces[-1])
    sampling, method, offset_kind, backbone, built = spaces
""")
CHECKS = textwrap.dedent("""
    import numpy as np
    from e4t_jax.e4t import vision as vision_lib
    images = sampling["images"]
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    assert np.isfinite(float(method["metrics"]["loss"])) and int(method["state"].step) == 1
    assert method["v_star"].shape == (1, method["e"].sd.text_dim)
    e = built["e"]
    assert isinstance(e.model.vision, vision_lib.Backbone) and e.params.head["vision_proj_0"]["kernel"].shape[0] == 32
    offsets = offset_kind["offsets"]
    assert all(set(leaf) == {"scale"} for leaf in offsets.offset_leaves(e.params.offsets, "column_scale").values())
    print("README-OK")
""")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands (continuation lines joined, comments dropped) as argv lists."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_readme_python_snippets_run_each_on_its_own(tmp_path):
    python = blocks("python")
    assert len(python) == 5, "README python blocks: sampling, the method, offset kind, backbone, build"
    paths = []
    for i, block in enumerate(python):
        paths.append(tmp_path / f"block{i}.py")
        paths[-1].write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUNNER + CHECKS, *map(str, paths)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert "README-OK" in done.stdout, done.stderr[-3000:]


def _program_commands(block: str) -> list[list[str]]:
    """Commands of the CLIs and benchmark scripts (``python bench/X.py ...`` as ``bench/X.py ...``)."""
    found = [argv[1:] if argv[0] == "python" else argv for argv in commands(block)]
    return [argv for argv in found if argv and argv[0] in PROGRAMS and "..." not in argv]


def test_every_readme_command_parses():
    found = [argv for block in blocks("bash") for argv in _program_commands(block)]
    assert len(found) >= 8
    for program, *argv in found:
        importlib.import_module(PROGRAMS[program]).parse_args(argv)  # argparse exits on an unknown option


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """A working folder with ``cat.png`` and ``photos/`` (three pictures), as the tiny block says."""
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for name in ("cat.png", "photos/a.png", "photos/b.jpg", "photos/c.png"):
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_tiny_commands_run(photos):
    tiny = [block for block in blocks("bash") if "--model tiny" in block]
    assert tiny, "the README shows the commands on the tiny model"
    for block in tiny:
        for program, *argv in commands(block):
            assert program in PROGRAMS, program
            assert importlib.import_module(PROGRAMS[program]).main(argv) == 0, (program, argv)
    assert (photos / "runs/tiny/encoder").is_dir() and (photos / "cat.preview.png").is_file()
    assert (photos / "out/grid.png").is_file() and (photos / "cat-diffusers/unet").is_dir()
