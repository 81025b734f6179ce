"""CLIP-I / CLIP-T (e4t_jax.eval.clip_score) with our CLIP towers, against transformers' CLIPModel.

torch and transformers are test dependencies: imported at the top, so that a missing one
fails this file instead of skipping the parity test.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import tiny_clip  # noqa: E402

from e4t_jax.eval import clip_score

PROMPTS = ["a photo of S* on the beach", "an oil painting of S* wearing a hat"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random CLIPModel saved by transformers, with the tiny tokenizer beside it."""
    folder = tiny_clip.write(tmp_path_factory.mktemp("clip_model"))
    return folder, transformers.CLIPModel.from_pretrained(folder).eval(), transformers.CLIPTokenizer.from_pretrained(
        folder)


@pytest.fixture(scope="module")
def scorer(model_folder):
    return clip_score.ClipScorer.from_folder(model_folder[0])


def _features(output) -> np.ndarray:
    """transformers 5 returns an output object from get_*_features, 4.x a tensor."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.numpy().astype(np.float64)


def test_clip_i_of_an_image_with_itself_is_one(scorer):
    image = skimage.data.astronaut()
    assert abs(scorer.clip_i(image, image) - 1.0) < 1e-6
    other = skimage.data.coffee()
    scores = scorer.clip_i([image, other], image)  # sizes differ
    assert scores.shape == (2,) and abs(scores[0] - 1.0) < 1e-6 and scores[1] < 1.0 - 1e-6


def test_clip_t_matches_transformers(model_folder, scorer):
    _, model, tokenizer = model_folder
    image = skimage.data.astronaut()
    ours = scorer.clip_t([image, image], PROMPTS, class_word="face")
    texts = [p.replace("S*", "face") for p in PROMPTS]
    assert texts[0] == "a photo of face on the beach"
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # The reference's pixels: ours (CLIPImageProcessor's steps in JAX), so the comparison is of the models.
    pixels = np.array(clip_score.clip.preprocess_images(image[None], 32)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        text_features = _features(model.get_text_features(input_ids=ids))
        image_features = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
    expected = clip_score.cosine(image_features, text_features)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert abs(ours[0] - ours[1]) > 1e-3  # the prompts matter
    assert scorer.clip_t(image, PROMPTS[0], class_word="face") == pytest.approx(ours[0], abs=1e-6)
    np.testing.assert_allclose(scorer.text_embeds(texts), text_features, atol=1e-4)
    np.testing.assert_allclose(scorer.image_embeds(image), image_features, atol=1e-4)


def test_preprocessing_is_close_to_clip_image_processor(scorer):
    """Our JAX preprocessing vs transformers' CLIPImageProcessor (PIL): a few 1/255 steps apart."""
    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)  # no torchvision
    processor = processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = skimage.data.astronaut()
    theirs = processor(images=image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    ours = np.asarray(clip_score.clip.preprocess_images(image[None], 32))
    assert np.abs(ours - theirs).mean() < 0.01  # measured 0.0037 (about 0.26/255 before normalization)


def test_clip_t_checks_counts(scorer):
    image = skimage.data.astronaut()
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.clip_t([image, image], PROMPTS + PROMPTS[:1], class_word="face")
