"""The README's Python snippets run as they are, on the embedded tiny model, in a fresh process."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS = textwrap.dedent("""
    import numpy as np
    from e4t_jax.e4t import vision as vision_lib
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    assert v_star.shape == (1, e.sd.text_dim)  # both snippets use the tiny model
    assert isinstance(e.model.vision, vision_lib.Backbone) and e.params.head["vision_proj_0"]["kernel"].shape[0] == 32
    assert all(set(leaf) == {"scale"} for leaf in offsets.offset_leaves(e.params.offsets, "column_scale").values())
    print("README-OK")
""")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_readme_python_snippets_run(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 5, "README python blocks: sampling, the method, offset kind, backbone, build"
    script = "\n".join(blocks) + CHECKS
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "README-OK" in done.stdout, done.stderr[-3000:]
