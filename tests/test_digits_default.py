"""The shipped digits preset personalizes a held-out digit from the command line.

``e4t-personalize --model digits`` (its shipped encoder by default) on ONE render of a
held-out digit, then ``e4t-generate`` with prompts that ask for new colours and
positions, in fresh processes with a fixed seed, as a user runs them. The pictures are
read back from their pixels (:mod:`e4t_jax.eval.digits`): the asked colours must
appear. Then ``e4t-demo`` runs with the same compilation cache.

Not asserted (yet): that the digit's identity survives. With the shipped encoder it
does not (identity is at chance in ``bench/minidomain.py``; see the README's
mini-domain section), so the classifier's verdict is only printed.
"""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from e4t_jax import digits
from e4t_jax.eval import digits as reading

DIGIT = digits.NUM_TRAIN  # the first held-out digit
ASKED = (("red", "white", "left"), ("yellow", "blue", "right"), ("green", "black", None), ("white", "purple", None))


def _run(*args, cwd, cache):
    done = subprocess.run([sys.executable, "-m", *args, "--cache-dir", str(cache)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits-default")
    glyphs, labels = digits.load_glyphs()
    attributes = digits.random_attributes(np.random.default_rng(DIGIT))
    Image.fromarray(digits.render(glyphs[DIGIT], attributes)).save(folder / "input.png")
    cache = folder / "xla"
    _run("infer.personalize", "--model", "digits", "--image", "input.png", "--no-preview", "--seed", "0",
         "--out", "concept.safetensors", cwd=folder, cache=cache)
    prompts = [digits.attribute_prompt("S*", *asked) for asked in ASKED]
    _run("infer.generate", "--model", "digits", "--concept", "concept.safetensors",
         *[arg for p in prompts for arg in ("--prompt", p)], "--num-images", "2", "--seed", "0", "--out", "images",
         cwd=folder, cache=cache)
    images = [np.asarray(Image.open(folder / "images" / f"{i:03d}.png")) for i in range(2 * len(prompts))]
    asked = [a for a in ASKED for _ in range(2)]  # generate writes num_images per prompt, prompt-major
    return folder, cache, int(labels[DIGIT]), images, asked


def test_the_asked_colours_appear(generated):
    _, _, label, images, asked = generated
    readings = [reading.read(image) for image in images]
    print(f"digit {label}: classified as {reading.DigitReader(renders=1).classify(readings).tolist()}")
    colours = np.mean([r.color == a[0] for r, a in zip(readings, asked)])
    backgrounds = np.mean([r.background == a[1] for r, a in zip(readings, asked)])
    print(f"digit colour {colours:.2f}, background {backgrounds:.2f}")
    assert colours >= 0.5 and backgrounds >= 0.75


def test_demo_writes_its_grid(generated):
    folder, cache, _, _, _ = generated
    _run("infer.demo", "--out", "demo", cwd=folder, cache=cache)
    grid = Image.open(folder / "demo" / "grid.png")
    assert grid.width > 6 * 16 * 8 and (folder / "demo" / "concept.safetensors").is_file()
    assert len(list((folder / "demo" / "images").glob("0*.png"))) == 6
