"""bench/compare_methods.py end to end on the tiny model: the domain word, Textual Inversion and E4T
on a real photo, the table, the JSON and the figure; bad input in one line. (DreamBooth's runs and
artifacts are tested in tests/test_dreambooth.py; a run of all seven methods is in bench/RESULTS.md.)

The tiny model's random pictures show no face, so their identity is "no face", never a number;
CLIP scores come from a tiny random CLIP (bench/tiny_clip.py).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import compare_methods, tiny_clip  # noqa: E402

METHODS = ["domain word", "TI-1", "E4T"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from e4t_jax.e4t.pretrained import preset_encoder_dir

    root = tmp_path_factory.mktemp("compare")
    (root / "concepts" / "astronaut").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).save(root / "concepts" / "astronaut" / "photo.png")
    (root / "concepts" / "empty").mkdir()  # skipped with a warning
    clip = tiny_clip.write(root / "clip")
    code = compare_methods.main([
        "--model", "tiny", "--encoder", str(preset_encoder_dir("tiny", "face")), "--concepts", str(root / "concepts"),
        "--clip", str(clip), "--methods", ",".join(METHODS), "--ti-steps", "2", "--e4t-steps", "1",
        "--e4t-batch-size", "4", "--samples", "2", "--sample-steps", "2", "--prompt", "a photo of S*",
        "--out", str(root / "out")])
    assert code == 0
    return root / "out"


def test_the_table_has_a_row_per_method_with_scores(report):
    lines = (report / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == METHODS
    rows = {row["method"]: row for row in json.loads((report / "results.json").read_text())["rows"]}
    for method in METHODS:
        row = rows[method]
        assert -1 <= row["clip_i"] <= 1 and -1 <= row["clip_t"] <= 1
        assert row["identity"] == "no face" and row["faces"] == "0/2"  # random pictures: no face, no number
    assert rows["domain word"]["bytes"] == 0 and rows["domain word"]["steps"] == 0
    assert 0 < rows["TI-1"]["bytes"] < rows["E4T"]["bytes"]  # an embedding; an embedding and offsets
    assert rows["TI-1"]["compile_s"] > 0 and rows["E4T"]["train_s"] > 0


def test_the_figure_has_the_input_and_a_column_per_method(report):
    figure = np.asarray(Image.open(report / "figure.png"))
    assert figure.shape == (18 + 4 + 128 + 4, 4 * (128 + 4) + 4, 3)
    pictures = sorted(p.name for p in (report / "concepts" / "astronaut" / "E4T" / "pictures").glob("*.png"))
    assert pictures == ["000.png", "001.png", "grid.png"]


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "concepts").mkdir()
    code = compare_methods.main(["--model", "tiny", "--concepts", str(tmp_path / "concepts"), "--class-word", "face",
                                 "--methods", "domain word", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --concepts") and "one folder per concept" in err[-1]
