"""The digits mini-domain: renders are what the captions say, and can be read back.

* a render holds exactly the background colour where there is no ink, and the digit
  colour where the glyph is solid; the digit sits where its position says;
* captions name colours and positions, never the digit;
* the split is fixed: 1,500 training digits, 297 held out;
* the reader recovers colours and positions from real renders of held-out digits, and
  its classifier, trained on the training split only, names held-out digits.
"""
import numpy as np
import pytest

from e4t_jax import digits
from e4t_jax.eval import digits as reading

GLYPHS, LABELS = digits.load_glyphs()


def test_split_is_fixed_and_disjoint():
    train, held_out = digits.split_indices("train"), digits.split_indices("held_out")
    assert len(train) == 1500 and len(held_out) == 297
    assert not set(train) & set(held_out)
    assert len(GLYPHS) == len(LABELS) == 1797
    with pytest.raises(ValueError, match="unknown split"):
        digits.split_indices("test")


@pytest.mark.parametrize("position", digits.POSITIONS)
def test_render_places_the_colours_and_the_digit(position):
    attributes = digits.Attributes("red", "blue", position, 10, 3)
    image = digits.render(GLYPHS[0], attributes)
    assert image.shape == (digits.CANVAS, digits.CANVAS, 3) and image.dtype == np.uint8
    blue, red = np.asarray(digits.COLORS["blue"]), np.asarray(digits.COLORS["red"])
    assert (image[0] == blue).all() and (image[-1] == blue).all()  # rows outside the digit
    is_red = np.linalg.norm(image - red, axis=-1) < np.linalg.norm(image - blue, axis=-1)  # ink > 1/2
    assert is_red.sum() >= 10
    columns = np.nonzero(is_red.any(0))[0]
    left = attributes.column()
    assert left <= columns.min() and columns.max() < left + 10
    assert {"left": left == 0, "center": left == 3, "right": left == 6}[position]


def test_color_pairs_have_contrast():
    pairs = digits.color_pairs()
    assert len(pairs) > 20
    for fg, bg in pairs:
        assert fg != bg
        assert np.linalg.norm(np.subtract(digits.COLORS[fg], digits.COLORS[bg])) >= digits.MIN_CONTRAST


def test_captions_describe_attributes_never_identity():
    rng = np.random.default_rng(0)
    names = "zero one two three four five six seven eight nine".split()
    for _ in range(200):
        attributes = digits.random_attributes(rng)
        text = digits.caption(attributes, rng)
        assert "digit" in text
        assert not any(ch.isdigit() for ch in text) and not any(n in text.split() for n in names)
        assert set(text.replace(",", "").split()) <= set(digits.WORDS)
    template = digits.caption(digits.random_attributes(rng), rng, word="{}")
    assert "{}" in template
    assert digits.attribute_prompt("S*", "orange", "black", "left") == "an orange S* on a black background, on the left"


def test_write_split_writes_images_with_caption_templates(tmp_path):
    count = digits.write_split(tmp_path, split="held_out", renders=1)
    assert count == 297
    pngs, txts = sorted(tmp_path.glob("*.png")), sorted(tmp_path.glob("*.txt"))
    assert len(pngs) == len(txts) == 297
    assert all("{}" in t.read_text() for t in txts[:20])


def test_reader_recovers_attributes_of_held_out_renders():
    rng = np.random.default_rng(1)
    held_out = digits.split_indices("held_out")
    hits = {"color": 0, "background": 0, "position": 0}
    n = 200
    for i in range(n):
        attributes = digits.random_attributes(rng)
        r = reading.read(digits.render(GLYPHS[held_out[i]], attributes))
        hits["color"] += r.color == attributes.color
        hits["background"] += r.background == attributes.background
        hits["position"] += r.position == attributes.position
    assert hits["background"] / n >= 0.97 and hits["color"] / n >= 0.95 and hits["position"] / n >= 0.95


def test_flat_picture_reads_as_no_ink():
    flat = np.full((16, 16, 3), 128, np.uint8)
    assert not reading.read(flat).has_ink


def test_classifier_names_held_out_digits_and_instances():
    reader = reading.DigitReader(renders=2)
    assert reader.held_out_accuracy(renders=1) >= 0.9
    held_out = digits.split_indices("held_out")
    candidates = np.stack([reading.reference_glyph(GLYPHS[i]) for i in held_out])
    rng = np.random.default_rng(2)
    ranks = [reading.instance_rank(reading.read(digits.render(GLYPHS[held_out[j]], digits.random_attributes(rng))).glyph,
                                   j, candidates) for j in range(60)]
    assert np.mean(np.asarray(ranks) < 5) >= 0.8
