"""Embedded Stable Diffusion models in diffusers format, created locally with no download.

``python -m e4t_jax.presets --out DIR [--preset tiny]`` writes a complete model folder -
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``image_encoder/``
(the CLIP vision tower E4T's encoder reads) and ``model_index.json`` - with random
weights from our own Flax initializers. diffusers' ``StableDiffusionPipeline.from_pretrained`` and
transformers load it too, which is what the parity tests rely on.

Presets:

* ``tiny``: 64x64 images (8x8 latents), U-Net channels (32, 64), 2-layer text encoder
  with the ~1.1k-token vocabulary of :func:`e4t_jax.tokenizer.make_tiny_tokenizer_files`.
  It runs every code path in seconds on a CPU. Its weights are random: its pictures
  show the mechanics, not image quality.
* ``medium``: the benchmark size: U-Net channels (64, 128, 256), 2 layers per block,
  256x256 images (32x32 latents).

* ``digits``: a TRAINED model of the digits mini-domain (:mod:`e4t_jax.digits`),
  16x16 pictures, shipped inside the package with its pre-trained domain encoder
  (:data:`SHIPPED`); ``python -m train.digits`` and ``e4t-pretrain --preset digits``
  made them on a 2-core CPU (``train/README.md``).

``--model tiny`` (or ``medium``) anywhere in the CLIs means: this folder, created
once under ``~/.cache/e4t_jax/``. A random preset is one entry of :data:`PRESETS`: a
function that returns the ``config.json`` of every component.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax import __version__, files, weights
from e4t_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer
from e4t_jax.models.unet import UNet2DConditionModel, UNetConfig
from e4t_jax.models.vae import AutoencoderKL, VAEConfig
from e4t_jax.tokenizer import TINY_VOCAB_SIZE, make_tiny_tokenizer_files

CACHE_ROOT = Path(os.environ.get("E4T_HOME", Path.home() / ".cache" / "e4t_jax"))

_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False,
    "clip_sample": False, "timestep_spacing": "leading",
}
_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [32, 64], "layers_per_block": 1,
    "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 16, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "use_linear_projection": False,
    "upcast_attention": False, "downsample_padding": 1,
}
_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
    "scaling_factor": 0.18215, "act_fn": "silu",
}
_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "vocab_size": TINY_VOCAB_SIZE, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
    "bos_token_id": TINY_VOCAB_SIZE - 2, "eos_token_id": TINY_VOCAB_SIZE - 1, "pad_token_id": TINY_VOCAB_SIZE - 1,
}
_VISION = {
    "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
    "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
}


def _tiny() -> dict[str, dict]:
    return {"unet": copy.deepcopy(_UNET), "vae": copy.deepcopy(_VAE), "text_encoder": copy.deepcopy(_TEXT),
            "image_encoder": copy.deepcopy(_VISION), "scheduler": copy.deepcopy(_SCHEDULER)}


def _medium() -> dict[str, dict]:
    configs = _tiny()
    configs["unet"].update(
        sample_size=32, block_out_channels=[64, 128, 256], layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=64, norm_num_groups=32,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    configs["vae"].update(sample_size=256)
    configs["text_encoder"].update(hidden_size=64, intermediate_size=128, projection_dim=64)
    configs["image_encoder"].update(hidden_size=64, intermediate_size=128, image_size=64, projection_dim=64)
    return configs


# Preset name -> the diffusers/transformers ``config.json`` of every component.
PRESETS = {"tiny": _tiny, "medium": _medium}


def full_size_configs() -> dict[str, dict]:
    """The component configs of the paper's model, for shapes only (no preset writes them).

    Stable Diffusion 1.5 (U-Net channels 320-1280, 64x64 latents of 512 px images, the
    CLIP ViT-L/14 text encoder) with OpenCLIP ViT-H/14 as E4T's vision tower, as
    ``runwayml/stable-diffusion-v1-5`` and ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    configure them. ``bench/memory.py`` compiles E4T's steps for these shapes from
    ``jax.eval_shape`` params, without weights. The tokenizer is the tiny one (only its
    77-token length matters for shapes).
    """
    configs = _tiny()
    configs["unet"].update(
        sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    configs["vae"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                          sample_size=512)
    configs["text_encoder"].update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, vocab_size=49408, projection_dim=768,
                                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    configs["image_encoder"].update(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                                    projection_dim=1024)
    return configs

ASSETS = Path(__file__).resolve().parent / "assets"
# Trained preset name -> its shipped folder: ``model/`` (diffusers format) and the domain
# encoder as ``encoder.safetensors`` + ``encoder.json``.
SHIPPED = {"digits": ASSETS / "digits"}


def is_preset(name: str) -> bool:
    """Whether ``name`` is a preset (random or shipped) rather than a folder or Hub id."""
    return name in PRESETS or name in SHIPPED


def preset_configs(preset: str) -> dict[str, dict]:
    """The diffusers/transformers ``config.json`` of every component of a preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    return PRESETS[preset]()


def random_params(module, *inputs, seed: int) -> dict:
    """Random params for ``module`` without compiling its init (numpy, instant).

    Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02^2), norm scales 1, biases 0.
    """
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_model(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Writes a diffusers-format Stable Diffusion folder with random weights.

    Returns:
      the folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
      ``image_encoder/``, ``model_index.json``).
    """
    out = Path(out_dir)
    configs = preset_configs(preset)
    unet_cfg = UNetConfig.from_diffusers(configs["unet"])
    vae_cfg = VAEConfig.from_diffusers(configs["vae"])
    text_cfg = CLIPTextConfig.from_dict(configs["text_encoder"])
    vision_cfg = CLIPVisionConfig.from_dict(configs["image_encoder"])
    latent = jnp.zeros((1, 8, 8, 4))
    params = {
        "unet": random_params(UNet2DConditionModel(unet_cfg), latent, jnp.zeros((1,)),
                             jnp.zeros((1, 77, unet_cfg.cross_attention_dim)), seed=seed),
        "vae": random_params(AutoencoderKL(vae_cfg), jnp.zeros((1, 64, 64, 3)), seed=seed + 1),
        "text_encoder": random_params(CLIPTextTransformer(text_cfg), jnp.zeros((1, 77), jnp.int32), seed=seed + 2),
        "image_encoder": random_params(CLIPVisionTransformer(vision_cfg),
                                      jnp.zeros((1, vision_cfg.image_size, vision_cfg.image_size, 3)), seed=seed + 3),
    }
    return write_folder(out, configs, params, preset=preset)


def write_folder(out_dir: str | os.PathLike, configs: dict[str, dict], params: dict, *, preset: str,
                 words: tuple[str, ...] | None = None) -> Path:
    """Writes a diffusers-format folder from component configs and params.

    Args:
      configs: ``config.json`` of ``unet``, ``vae``, ``text_encoder``, ``image_encoder``
        and ``scheduler``.
      params: params of ``unet``, ``vae``, ``text_encoder``, ``image_encoder``.
      preset: recorded in ``model_index.json``.
      words: the tiny tokenizer's one-token words (default: its own list).
    """
    out = Path(out_dir)
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors", "image_encoder": "model.safetensors"}
    prefixes = {"text_encoder": "text_model.", "image_encoder": "vision_model."}
    for name, file in files.items():
        weights.save_safetensors(params[name], out / name / file, prefix=prefixes.get(name, ""),
                                 metadata={"format": "pt"})
        _write_json(out / name / "config.json", configs[name])
    _write_json(out / "scheduler" / "scheduler_config.json", configs["scheduler"])
    make_tiny_tokenizer_files(out / "tokenizer", **({} if words is None else {"words": words}))
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", "_e4t_jax_version": __version__,
        "_e4t_jax_preset": preset,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    })
    return out


def preset_dir(preset: str) -> Path:
    """The preset's model folder: shipped in the package, or for a random preset under
    ``~/.cache/e4t_jax`` (``$E4T_HOME``), created on first use."""
    if preset in SHIPPED:
        folder = SHIPPED[preset] / "model"
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"the {preset} preset's weights are missing from {folder}: reinstall e4t-jax "
                                    "from its source folder (pip install -e .)")
        return folder
    folder = CACHE_ROOT / f"{preset}-sd-v{__version__}"
    if not (folder / "model_index.json").is_file():
        with files.atomic_path(folder) as tmp:
            write_model(tmp, preset)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"{args.out} exists; choose a new folder")
    print(write_model(args.out, args.preset, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
