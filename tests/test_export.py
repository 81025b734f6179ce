"""Export to diffusers: the exported U-Net + embedding reproduce our personalized images."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from e4t_jax import pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import export as export_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from infer import export

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of S*"
STEPS, GUIDANCE = 10, 7.5


def _make_concept(path, sd, params):
    """A concept with a random ``v*`` (norm like the vocabulary's), non-zero low-rank domain offsets
    and a random change of them."""
    rng = np.random.default_rng(0)
    table = params["text"]["embeddings"]["token_embedding"]["embedding"]
    direction = rng.standard_normal(table.shape[1]).astype(np.float32)
    embedding = direction / np.linalg.norm(direction) * np.linalg.norm(table, axis=1).mean()
    config = offsets_lib.OffsetConfig()
    domain = offsets_lib.init_offsets(jax.random.key(0), params["unet"], config)
    domain = jax.tree_util.tree_map_with_path(
        lambda p, leaf: 0.1 * rng.standard_normal(leaf.shape).astype(np.float32) if p[-1].key == "up" else leaf,
        jax.device_get(domain))
    delta = jax.tree.map(lambda leaf: 0.05 * rng.standard_normal(leaf.shape).astype(np.float32), domain)
    e4t_config = E4TConfig(model=ModelConfig(domain_word="cat", placeholder="S*"), offsets=config)
    return concept_lib.save_concept(path, embedding=embedding, config=e4t_config, sd=sd, domain=domain, delta=delta)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny reference runs in ~0.5 s on one thread; several threads on a busy CPU take ~20x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """``(concept file, export folder, our uint8 image, initial latents NCHW)``."""
    tmp = tmp_path_factory.mktemp("export")
    sd, params, tokenizer = pipeline.load_model(tiny_model_dir)
    concept_file = _make_concept(tmp / "concept.safetensors", sd, params)
    loaded = concept_lib.load_concept(concept_file, sd, tokenizer)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    images = pipeline.Generator(sd)(params, tokenizer.encode([PROMPT]), tokenizer.encode([""]),
                                    latents=latents.numpy().transpose(0, 2, 3, 1), num_steps=STEPS,
                                    guidance=GUIDANCE, sampler="ddim", hooks=loaded.hooks())
    out = tmp / "out"
    assert export.main(["--concept", str(concept_file), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    return concept_file, out, pipeline.to_uint8(images), latents


def _diffusers_image(model_dir, embedding_path, latents, unet=None):
    kwargs = {"unet": unet} if unet is not None else {}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, **kwargs)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(embedding_path, token="S*")
    images = pipe(PROMPT, latents=latents, guidance_scale=GUIDANCE, num_inference_steps=STEPS, output_type="np").images
    return pipeline.to_uint8(images)


def _mean_abs(a, b):
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255


def test_diffusers_reproduces_our_personalized_image(exported, tiny_model_dir):
    _, out, ours, latents = exported
    assert json.loads((out / export_lib.INFO_FILE).read_text())["placeholder"] == "S*"
    assert "S*" in (out / "README.md").read_text()
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    theirs = _diffusers_image(tiny_model_dir, out / export_lib.EMBEDDING_FILE, latents, unet=unet)
    assert theirs.std() > 10, "flat images: the comparison would be meaningless"
    assert _mean_abs(ours, theirs) <= 2 / 255, f"mean absolute pixel difference {_mean_abs(ours, theirs) * 255:.2f}/255"
    base = _diffusers_image(tiny_model_dir, out / export_lib.EMBEDDING_FILE, latents)
    assert _mean_abs(base, theirs) > 8 / 255, "the offsets barely change the image: the test could not see them"


def test_full_pipeline_loads_in_diffusers(exported, tiny_model_dir, tmp_path):
    concept_file, out, ours, latents = exported
    full = tmp_path / "full"
    assert export.main(["--concept", str(concept_file), "--model", str(tiny_model_dir), "--out", str(full),
                        "--full-pipeline", "--dtype", "float16"]) == 0
    assert {p.name for p in full.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                 "scheduler", export_lib.EMBEDDING_FILE}
    merged16 = load_file(full / "unet" / export_lib.UNET_WEIGHTS)
    merged32 = load_file(out / "unet" / export_lib.UNET_WEIGHTS)
    assert all(v.dtype == np.float16 for v in merged16.values()) and merged16.keys() == merged32.keys()
    unet = diffusers.UNet2DConditionModel.from_pretrained(full / "unet", torch_dtype=torch.float32)
    theirs = _diffusers_image(full, full, latents, unet=unet)
    assert _mean_abs(ours, theirs) <= 2 / 255, f"mean absolute pixel difference {_mean_abs(ours, theirs) * 255:.2f}/255"


@pytest.mark.parametrize("case, message", [
    ("other_base_model", "another base model"),
    ("bad_config", "concept config.offsets.rank must be int"),
    ("not_a_concept", "not an E4T concept"),
    ("missing", "does not exist"),
])
def test_bad_concept_is_one_clear_message(tiny_model_dir, tmp_path, capsys, case, message):
    concept_file = tmp_path / "concept.safetensors"
    if case in ("other_base_model", "bad_config"):
        sd, params, _ = pipeline.load_model(tiny_model_dir)
        tensors, header = concept_lib.read_concept(_make_concept(tmp_path / "good.safetensors", sd, params))
        if case == "other_base_model":
            header["base_model"] = {"text_width": 768, "cross_attention_dim": 768, "unet_config_sha256": "0" * 64}
        else:
            header["config"]["offsets"]["rank"] = "four"
        save_file(tensors, str(concept_file), metadata={"e4t": json.dumps(header)})
    elif case == "not_a_concept":
        save_file({"weight": np.ones((2, 2), np.float32)}, str(concept_file))
    out = tmp_path / "out"
    code = export.main(["--concept", str(concept_file), "--model", str(tiny_model_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "a temporary folder was left behind"


def test_refuses_a_non_empty_out(exported, tiny_model_dir, capsys):
    concept_file, out, _, _ = exported
    before = sorted(p.name for p in out.iterdir())
    assert export.main(["--concept", str(concept_file), "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
