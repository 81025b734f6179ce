"""Text-to-image: end-to-end parity with diffusers, one compiled program, CLI errors."""
import numpy as np
import pytest
from PIL import Image

from e4t_jax import pipeline
from infer import generate

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return pipeline.load_model(tiny_model_dir)


def test_generate_cli_matches_diffusers(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    reference = pipe([PROMPT, "an oil painting of a dog"], latents=latents, guidance_scale=7.5,
                     num_inference_steps=10, output_type="np").images
    assert reference.std() > 0.05, "the reference images are flat: the comparison would be meaningless"
    np.save(tmp_path / "latents.npy", latents.numpy())
    code = generate.main(["--model", str(tiny_model_dir), "--prompt", PROMPT, "--prompt", "an oil painting of a dog",
                          "--steps", "10", "--guidance", "7.5", "--sampler", "ddim",
                          "--init-latents", str(tmp_path / "latents.npy"), "--out", str(tmp_path / "out")])
    assert code == 0
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png")) for i in range(2)])
    reference_uint8 = pipeline.to_uint8(reference)
    diff = np.abs(ours.astype(np.float64) - reference_uint8).mean() / 255
    assert diff <= 2 / 255, f"mean absolute pixel difference {diff * 255:.2f}/255"
    assert (tmp_path / "out" / "grid.png").is_file()
    assert "a photo of a cat" in (tmp_path / "out" / "prompts.txt").read_text()


def test_second_call_compiles_nothing(loaded):
    model, params, tokenizer = loaded
    generator = pipeline.Generator(model)
    first = generator(params, tokenizer.encode(["a cat", "a dog"]), tokenizer.encode(["", ""]), seed=0, num_steps=3)
    second = generator(params, tokenizer.encode(["a painting of a man", "a beach"]), tokenizer.encode(["ugly", ""]),
                       seed=1, num_steps=3, guidance=5.0)
    assert generator.traces == 1
    assert first.shape == second.shape == (2, 64, 64, 3)
    assert not np.allclose(first, second)
    again = generator(params, tokenizer.encode(["a cat", "a dog"]), tokenizer.encode(["", ""]), seed=0, num_steps=3)
    np.testing.assert_array_equal(first, again)  # deterministic for a seed


@pytest.mark.parametrize("args, message", [
    (["--sampler", "heun"], "invalid choice: 'heun'"),
    (["--height", "60"], "multiple of 8"),
    (["--model", "/nonexistent/model"], "does not exist"),
])
def test_cli_bad_input_is_one_clear_message(tiny_model_dir, tmp_path, capsys, args, message):
    argv = ["--model", str(tiny_model_dir), "--prompt", PROMPT, "--out", str(tmp_path / "out"), *args]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_long_prompt_is_truncated_with_a_warning(loaded):
    _, _, tokenizer = loaded
    with pytest.warns(UserWarning, match="truncat"):
        ids = tokenizer.encode(["a photo of a cat " * 40])
    assert ids.shape == (1, 77)
