"""DreamBooth / TI+DreamBooth on the tiny model (one e4t-dreambooth run, shared by the module):

* with prior preservation the instance loss on fixed noise falls;
* the folder it writes loads in diffusers (U-Net weights equal ours, the pipeline with
  its learned embedding) and in our own loader (the concept file too);
* the class images are cached and reused;
* the LoRA variant's merged U-Net is the base one with the saved offsets applied, and a
  trained text encoder is written in diffusers' naming;
* bad input ends with one line and exit status 2, nothing written.
"""
import json

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from e4t_jax import pipeline, weights
from e4t_jax.baselines import dreambooth as db
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import export as export_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.recipes import dreambooth as recipe
from train import dreambooth as cli

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def class_args(count: int = 2) -> list[str]:
    return ["--class-word", "cat", "--num-class-images", str(count), "--class-steps", "2"]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    Image.fromarray(photos.chelsea()).save(folder / "cat.png")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_model_dir, instance_dir, tmp_path_factory):
    """The folder of one TI+DreamBooth run (U-Net + text encoder + S*, prior preservation)."""
    out = tmp_path_factory.mktemp("runs") / "cat-db"
    argv = ["--model", str(tiny_model_dir), "--data", str(instance_dir), *class_args(), "--prior-preservation",
            "--steps", "4", "--lr", "1e-4", "--textual-inversion", "--out", str(out)]
    assert cli.main(argv) == 0
    return out


def test_prior_preservation_lowers_the_instance_loss(trained):
    info = json.loads((trained / recipe.INFO_FILE).read_text())
    assert info["class_prompt"] == "a photo of a cat" and info["instance_prompt"] == "a photo of S* cat"
    assert info["instance_loss_after"] < 0.99 * info["instance_loss_before"], info


def test_diffusers_and_our_loader_read_the_folder(trained, tiny_model_dir):
    sd, params, tokenizer = pipeline.load_model(trained)
    _, base, _ = pipeline.load_model(tiny_model_dir)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(trained / "unet").state_dict()
    ours = weights.params_to_state_dict(jax.device_get(params["unet"]))
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key].numpy(), value, err_msg=key)
    for part in ("unet",):
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params[part], base[part])
        assert any(jax.tree.leaves(changed)), f"{part} did not train"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(trained, safety_checker=None)
    pipe.load_textual_inversion(trained / export_lib.EMBEDDING_FILE, token="S*")
    concept = concept_lib.load_concept(trained / recipe.CONCEPT_FILE, sd, tokenizer)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("S*")]
    np.testing.assert_allclose(concept.embedding, row.detach().numpy(), rtol=1e-6)
    assert concept.domain is None and concept.placeholder == "S*"


def test_class_images_are_reused(trained, tiny_model_dir, monkeypatch):
    sd, params, tokenizer = pipeline.load_model(tiny_model_dir)
    cache = recipe.class_cache_dir(sd, "a photo of a cat", 2, seed=0, steps_count=2, dtype="float32")
    stamps = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
    assert len(stamps) == 2

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached class images were generated again")

    monkeypatch.setattr(pipeline.Generator, "__call__", no_sampling)
    images = recipe.class_images(sd, params, tokenizer, "a photo of a cat", 2, seed=0, steps_count=2,
                                 dtype="float32")
    assert len(images) == 2 and images[0].shape == (64, 64, 3)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == stamps
    assert recipe.class_cache_dir(sd, "a photo of a cat", 3, seed=0, steps_count=2, dtype="float32") != cache


def test_lora_folder_is_the_base_unet_with_its_offsets(tiny_model_dir, tmp_path):
    sd, base, _ = pipeline.load_model(tiny_model_dir)
    params = db.init_params(base, jax.random.key(0), lora_rank=2)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(  # a non-zero change, as training would make
        lambda p, leaf: rng.standard_normal(leaf.shape).astype(np.float32) if p[-1].key == "up" else leaf, params)
    shapes = jax.eval_shape(lambda p: db.loss(p, db.frozen_params(base, p), {
        "pixels": np.zeros((2, 64, 64, 3), np.float32), "input_ids": np.zeros((2, 77), np.int32),
        "index": np.arange(2, dtype=np.int32), "prior": np.array([False, True])}, jax.random.key(0), sd=sd)[0], params)
    assert shapes.shape == ()
    config = recipe.DreamBoothConfig(class_word="cat", lora_rank=2)
    recipe.save(tmp_path / "lora", sd, base, config, recipe.Trained(jax.device_get(params), 1.0, 0.5, {}), {})
    _, loaded, _ = pipeline.load_model(tmp_path / "lora")
    offsets = weights.load_pytree(tmp_path / "lora" / recipe.LORA_FILE)
    expected = offsets_lib.apply_offsets(base["unet"], offsets, "lowrank")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), loaded["unet"], expected)
    lora_bytes = (tmp_path / "lora" / recipe.LORA_FILE).stat().st_size
    assert lora_bytes < (tmp_path / "lora" / "unet" / export_lib.UNET_WEIGHTS).stat().st_size / 5


def test_trained_text_encoder_is_written_in_diffusers_naming(tiny_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    sd, base, _ = pipeline.load_model(tiny_model_dir)
    text = jax.tree.map(lambda leaf: np.asarray(leaf) + 0.01, base["text"])  # as training would change it
    config = recipe.DreamBoothConfig(class_word="cat", train_text=True)
    recipe.save(tmp_path / "db", sd, base, config, recipe.Trained({"unet": base["unet"], "text": text}, 1.0, 0.5, {}),
                {})
    _, loaded, _ = pipeline.load_model(tmp_path / "db")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded["text"]), text)
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "db" / "text_encoder")
    np.testing.assert_array_equal(theirs.get_input_embeddings().weight.detach().numpy(),
                                  text["embeddings"]["token_embedding"]["embedding"])


@pytest.mark.parametrize("case, message", [
    ("empty", "no images found"),
    ("not_images", "is not a readable picture"),
    ("no_class_images", "--num-class-images must be at least 1"),
])
def test_bad_input_is_one_line_and_status_2(tiny_model_dir, tmp_path, capsys, case, message):
    folder = tmp_path / "data"
    folder.mkdir()
    if case == "not_images":
        (folder / "a.png").write_text("not a picture")
        (folder / "b.jpg").write_bytes(b"\x00" * 64)
    elif case == "no_class_images":
        Image.fromarray(photos.chelsea()).save(folder / "cat.png")
    argv = ["--model", str(tiny_model_dir), "--data", str(folder), *class_args(0 if case == "no_class_images" else 2),
            "--prior-preservation", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
