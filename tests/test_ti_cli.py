"""``e4t-ti`` (Textual Inversion as a CLI) on the tiny model, from two real photos.

* one run writes the concept and the diffusers embedding; the loss on a fixed batch falls;
* ``e4t-generate --concept`` samples it, and the picture differs from the init word's;
* diffusers' ``load_textual_inversion`` puts exactly our vector at the placeholder's id;
* bad inputs end with one line and exit status 2, before anything is written.
"""
import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from e4t_jax import config as config_lib, pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t.config import E4TConfig
from e4t_jax.recipes.textual_inversion import embeds_path
from infer import generate
from train import textual_inversion

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _photos(folder):
    folder.mkdir()
    Image.fromarray(photos.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(photos.chelsea()).save(folder / "chelsea.jpg")
    return folder


@pytest.fixture(scope="module")
def learned(tiny_model_dir, tmp_path_factory):
    """``(concept file, argv)`` of one run: 15 steps x 2 at lr 5e-2 (the tiny U-Net heeds its prompt weakly)."""
    tmp = tmp_path_factory.mktemp("ti")
    out = tmp / "cat.safetensors"
    argv = ["--model", str(tiny_model_dir), "--data", str(_photos(tmp / "photos")), "--init-word", "cat",
            "--steps", "15", "--batch-size", "2", "--lr", "5e-2", "--out", str(out)]
    assert textual_inversion.main(argv) == 0
    return out, argv


def test_run_writes_concept_and_diffusers_file_and_loss_falls(learned, capsys):
    out, argv = learned
    tensors, header = concept_lib.read_concept(out)
    assert set(tensors) == {"embedding"} and header["config"]["model"]["domain_word"] == "cat"
    run = header["run"]
    assert run["method"] == "textual_inversion" and run["images"] == ["astronaut.png", "chelsea.jpg"]
    assert run["train"]["steps"] == 15 and set(run["seconds"]) == {"compile", "train"}
    assert run["loss_after"] < run["loss_before"], run
    assert embeds_path(out).is_file()
    assert textual_inversion.main(argv) == 2  # outputs exist: --force needed
    assert "already exists" in capsys.readouterr().err


def test_concept_generates_and_differs_from_the_init_word(learned, tiny_model_dir, tmp_path):
    """The init word's picture is sampled as a concept whose ``v*`` is the word's own row: the
    same text-encoder input as "a photo of cat", and the same compiled program (a cache hit)."""
    out, _ = learned
    tensors, header = concept_lib.read_concept(out)
    sd, params, tokenizer = pipeline.load_model(tiny_model_dir)
    word = params["text"]["embeddings"]["token_embedding"]["embedding"][tokenizer.token_ids("cat")[0]]
    config = config_lib.from_dict(E4TConfig, header["config"])
    init = concept_lib.save_concept(tmp_path / "init.safetensors", embedding=word, config=config, sd=sd)
    latents = tmp_path / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    for name, concept in (("learned", out), ("init", init)):
        argv = ["--model", str(tiny_model_dir), "--concept", str(concept), "--prompt", "a photo of S*",
                "--init-latents", str(latents), "--steps", "3", "--out", str(tmp_path / name)]
        assert generate.main(argv) == 0
    learned_image, init_image = (np.asarray(Image.open(tmp_path / name / "000.png"), np.float64)
                                 for name in ("learned", "init"))
    assert np.abs(learned_image - init_image).mean() > 0.1, "the learned embedding does not change the picture"


def test_diffusers_loads_the_same_embedding(learned, tiny_model_dir):
    out, _ = learned
    ours = concept_lib.read_concept(out)[0]["embedding"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_textual_inversion(str(embeds_path(out)), token="S*")
    _, _, tokenizer = pipeline.load_model(tiny_model_dir)
    token_id, _ = tokenizer.add_placeholder("S*", "cat")
    assert pipe.tokenizer.convert_tokens_to_ids("S*") == token_id
    row = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().numpy()
    np.testing.assert_array_equal(row, ours)


@pytest.mark.parametrize("case, message", [
    ("empty", "no images found"),
    ("not_images", "no images found"),
    ("unreadable", "is not a readable picture"),
    ("multi_token", "tokens, not one"),
    ("no_init_word", "--init-word"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, case, message):
    folder = tmp_path / "photos"
    if case in ("multi_token", "no_init_word"):
        _photos(folder)
    else:
        folder.mkdir()
    if case == "not_images":
        (folder / "notes.txt").write_text("not a picture")
    if case == "unreadable":
        (folder / "fake.png").write_text("not a picture")
    out = tmp_path / "out" / "c.safetensors"
    argv = ["--model", str(tiny_model_dir), "--data", str(folder), "--out", str(out)]
    argv += {"multi_token": ["--init-word", "catdog"], "no_init_word": []}.get(case, ["--init-word", "cat"])
    assert textual_inversion.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_force_never_replaces_a_foreign_file_and_help_shows_defaults(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    foreign = embeds_path(out)
    foreign.write_text("my notes")
    argv = ["--model", str(tiny_model_dir), "--data", str(_photos(tmp_path / "photos")), "--init-word", "cat",
            "--out", str(out), "--force"]
    assert textual_inversion.main(argv) == 2
    assert "is not a textual-inversion embedding file" in capsys.readouterr().err
    assert foreign.read_text() == "my notes" and not out.exists()
    assert textual_inversion.main(["--help"]) == 0
    assert "(default: 1000)" in capsys.readouterr().out
