"""Face identity (dlib's ResNet descriptor) and face masks (e4t_jax.eval.faces), and --mask auto.

dlib is the ``faces`` extra; it is imported at the top so that a missing dlib fails this
file instead of skipping it.
"""
import logging
import sys

import dlib  # noqa: F401  (the faces extra: fail, not skip, without it)
import numpy as np
import pytest
import skimage.data
from PIL import Image

from e4t_jax.e4t.pretrained import preset_encoder_dir
from e4t_jax.eval import faces
from e4t_jax.training import data
from infer import personalize


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


def _flipped_and_noised(image: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0.0, 4.0, image.shape)
    return np.clip(image[:, ::-1].astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_the_astronaut_is_the_same_person_flipped_and_noised(astronaut):
    embeddings = faces.embed_faces(astronaut)
    assert embeddings.dtype == np.float32 and embeddings.shape[1:] == (128,) and len(embeddings) >= 1
    distance = faces.identity_distance(astronaut, _flipped_and_noised(astronaut))
    assert isinstance(distance, float) and 0.0 <= distance < 0.6, distance
    assert faces.same_person(distance)
    assert faces.format_distance(distance) == f"{distance:.3f}"
    print(f"astronaut vs flipped+noised: {distance:.4f}")


def test_a_picture_without_a_face_has_no_identity(astronaut):
    coffee = skimage.data.coffee()
    assert faces.embed_faces(coffee).shape == (0, 128)
    assert faces.embed_face(coffee) is None
    for distance in (faces.identity_distance(astronaut, coffee), faces.identity_distance(coffee, astronaut)):
        assert distance is faces.NO_FACE and not isinstance(distance, (int, float))
        assert not faces.same_person(distance)
        assert faces.format_distance(distance) == str(distance) == "no face"
        with pytest.raises(TypeError):
            distance < 0.6  # noqa: B015  (never silently compared or averaged as a number)


def test_any_embedding_function_plugs_in(astronaut):
    """identity_distance takes any image -> embedding function and metric (ArcFace etc.)."""
    colour = lambda image: None if image.mean() < 1 else image.reshape(-1, 3).mean(0)  # noqa: E731
    assert faces.identity_distance(astronaut, astronaut, embed=colour) == 0.0
    assert faces.identity_distance(astronaut, np.zeros_like(astronaut), embed=colour) is faces.NO_FACE
    assert faces.identity_distance(astronaut, astronaut[::-1], embed=colour,
                                   metric=faces.cosine_distance) == pytest.approx(0.0, abs=1e-12)


def test_face_mask_covers_the_face_and_not_the_background(astronaut):
    mask = faces.face_mask(astronaut)
    assert mask.dtype == np.uint8 and mask.shape == astronaut.shape
    assert set(np.unique(mask)) <= {0, 255} and (mask == mask[..., :1]).all()
    left, top, right, bottom = faces.face_boxes(astronaut)[0]  # dlib's detected face rectangle
    inside = (mask[top:bottom, left:right, 0] > 0).mean()
    overall = (mask[..., 0] > 0).mean()
    assert inside > 0.9, inside
    assert overall < 0.2, overall
    assert all(mask[y, x, 0] == 0 for y in (0, -1) for x in (0, -1))
    print(f"astronaut face mask: {inside:.3f} of dlib's box, {overall:.4f} of the image")


def test_the_dilation_grows_the_landmark_hull(astronaut):
    landmarks = faces.face_landmarks(astronaut)
    assert landmarks.shape[1:] == (68, 2)
    height, width = astronaut.shape[:2]
    tight = faces.mask_from_landmarks(landmarks[:1], height, width, dilation=0.0)[..., 0] > 0
    grown = faces.mask_from_landmarks(landmarks[:1], height, width)[..., 0] > 0
    assert tight.sum() < grown.sum() and not (tight & ~grown).any()
    # Every landmark lies inside the tight hull (up to the polygon's pixel edge).
    x, y = np.round(landmarks[0]).astype(int).T
    assert tight[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)].mean() > 0.9


def test_face_mask_without_a_face_is_a_clear_error():
    with pytest.raises(faces.NoFaceError, match="no face found in coffee.png"):
        faces.face_mask(skimage.data.coffee(), what="coffee.png")


def test_a_missing_dlib_names_the_extra(monkeypatch):
    faces._dlib.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    try:
        with pytest.raises(ImportError, match=r'pip install "e4t-jax\[faces\]"') as caught:
            faces.embed_faces(skimage.data.astronaut())
        assert isinstance(caught.value, faces.UserError)  # the CLIs print it as one line, exit 2
        assert not faces.available()
    finally:
        faces._dlib.cache_clear()


def test_augmented_batch_refuses_a_mask_of_another_size(astronaut):
    with pytest.raises(ValueError, match="the mask is 256x256 pixels but the image 512x512"):
        data.augmented_batch(astronaut, size=32, batch_size=2, rng=np.random.default_rng(0),
                             mask=np.zeros((256, 256, 3), np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces_cli")
    paths = {"astronaut": folder / "astronaut.png", "coffee": folder / "coffee.png", "small": folder / "small.png"}
    Image.fromarray(skimage.data.astronaut()).save(paths["astronaut"])
    Image.fromarray(skimage.data.coffee()).save(paths["coffee"])
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(paths["small"])
    return paths


def _personalize(image, mask, out) -> int:
    return personalize.main(["--model", "tiny", "--encoder", str(preset_encoder_dir("tiny", "face")),
                             "--image", str(image), "--mask", str(mask), "--steps", "2", "--batch-size", "2",
                             "--no-preview", "--out", str(out)])


def test_mask_auto_personalizes_the_astronaut(photos, tmp_path, caplog):
    out = tmp_path / "me.safetensors"
    with caplog.at_level(logging.INFO, logger="e4t.personalize"):
        assert _personalize(photos["astronaut"], "auto", out) == 0
    assert out.is_file()
    assert any("face mask (--mask auto)" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("image, mask, message", [
    ("coffee", "auto", "no face found in"),
    ("astronaut", "small", "small.png is 64x64 pixels but image"),
], ids=["auto-without-a-face", "mask-of-another-size"])
def test_bad_masks_exit_2_with_one_line(photos, image, mask, message, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    capsys.readouterr()
    code = _personalize(photos[image], "auto" if mask == "auto" else photos[mask], out)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_pretraining_batches_carry_face_masks_aligned_with_their_crops(tmp_path):
    """make_dataset(face_masks=True): one mask per image, cropped and flipped with it; a faceless one all white."""
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.png")
    size = 64
    batches = data.make_dataset(tmp_path, size=size, batch_size=2, seed=0, templates="face", num_epochs=3,
                                crop_scale=(1.0, 1.0), read_threads=1, face_masks=True)
    whole = np.asarray(Image.fromarray(astronaut).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    expected = faces.face_mask(astronaut)[..., 0] > 0
    expected = np.asarray(Image.fromarray(expected).resize((size, size), Image.Resampling.BICUBIC)) > 0
    flips = set()
    for batch in batches:
        assert batch["mask"].shape == (2, size, size) and batch["mask"].dtype == np.float32
        for pixels, mask in zip(batch["pixels"], batch["mask"]):
            assert 0.0 <= mask.min() and mask.max() <= 1.0
            if mask.min() == 1.0:  # the coffee: no face, its whole loss counts
                continue
            assert 0.0 < mask.mean() < 0.2
            pixels = (pixels + 1.0) * 127.5
            flipped = np.abs(pixels - whole[:, ::-1]).mean() < np.abs(pixels - whole).mean()
            flips.add(flipped)
            reference = expected[:, ::-1] if flipped else expected
            assert ((mask > 0.5) == reference).mean() > 0.98  # the same crop and flip as the picture
    assert flips == {False, True}, flips  # (seeded) both orientations met: the mask followed each


def test_pretrain_face_masks_flag_is_recorded():
    from train import pretrain_encoder

    args = pretrain_encoder.parse_args(["--preset", "tiny", "--model", "tiny", "--data", "photos", "--out", "runs/x",
                                        "--face-masks"])
    assert pretrain_encoder.build_config(args).data.face_masks is True
    args = pretrain_encoder.parse_args(["--preset", "tiny", "--model", "tiny", "--data", "photos", "--out", "runs/x"])
    assert pretrain_encoder.build_config(args).data.face_masks is False


def test_pretrain_with_face_masks_but_no_dlib_stops_before_loading(tmp_path, monkeypatch):
    import dataclasses

    from e4t_jax.recipes import pretrain

    (tmp_path / "photos").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "photos" / "a.png")
    config = pretrain.PRESETS["tiny"]
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(tmp_path / "photos"),
                                                                  face_masks=True))
    options = pretrain.RunOptions(out=tmp_path / "run")
    pretrain.check(config, options)  # dlib is here
    faces._dlib.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)
    try:
        with pytest.raises(faces.UserError, match=r'pip install "e4t-jax\[faces\]"'):
            pretrain.check(config, options)
    finally:
        faces._dlib.cache_clear()
