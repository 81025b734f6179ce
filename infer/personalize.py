"""Personalize Stable Diffusion from ONE image with a pre-trained E4T domain encoder.

Example::

    e4t-personalize --model runwayml/stable-diffusion-v1-5 --encoder faces-encoder/ \
        --image me.jpg --steps 15 --batch-size 16 --out me.safetensors

Tunes the encoder head and the U-Net weight offsets for a few steps on augmented
copies of the image, then writes a small concept file (``v*`` + offsets) and a preview
grid beside it (``me.png``), and prints a timing breakdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np

from e4t_jax import cli

log = logging.getLogger("e4t.personalize")
DEFAULT_PREVIEW = ("a photo of {}", "an oil painting of {}", "a watercolor painting of {}", "a pencil sketch of {}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e4t-personalize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model folder, Hugging Face id, or preset 'tiny' / 'medium'")
    p.add_argument("--encoder", type=Path, required=True, help="pre-trained domain encoder folder (e4t-pretrain)")
    p.add_argument("--image", type=Path, required=True, help="the one image of the concept")
    p.add_argument("--mask", type=Path, default=None, help="optional loss mask image (white = the concept)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16, help="augmented copies of the image per step")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (the paper tunes at ~5e-6 to 1.6e-5)")
    p.add_argument("--tune-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="tune the encoder head too (default), or the weight offsets only")
    p.add_argument("--save-encoder", action="store_true", help="also store the tuned encoder head in the concept")
    p.add_argument("--placeholder", default=None, help="placeholder token (default: the encoder's, usually S*)")
    p.add_argument("--clip-vision", default=None, help="CLIP vision model (default: the encoder's)")
    p.add_argument("--preview-prompt", action="append", default=None,
                   help="prompt for the preview grid, with the placeholder (repeatable)")
    p.add_argument("--preview-steps", type=int, default=25)
    p.add_argument("--no-preview", action="store_true", help="skip the preview grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True, help="concept file to write (.safetensors)")
    return p.parse_args(argv)


def read_image(path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]``, or a :class:`cli.UserError` that says what is wrong with the file."""
    from e4t_jax.training.data import load_image

    if not path.is_file():
        raise cli.UserError(f"image {path} does not exist")
    image = load_image(path)
    if image is None:
        raise cli.UserError(f"{path} is not a readable picture (jpg, png, webp, ...)")
    return image


def augmented_batch(image: np.ndarray, *, size: int, batch_size: int, rng: np.random.Generator,
                    mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``batch_size`` random crops/flips of one image (and of its mask, identically)."""
    from e4t_jax.training.data import augment

    pixels, masks = [], []
    for _ in range(batch_size):
        state = rng.bit_generator.state
        pixels.append(augment(image, rng, size))
        if mask is not None:
            twin = np.random.default_rng()
            twin.bit_generator.state = state
            masks.append((augment(mask, twin, size)[..., 0] + 1) / 2)
    batch = {"pixels": np.stack(pixels), "index": np.arange(batch_size, dtype=np.int32)}
    if mask is not None:
        batch["mask"] = np.stack(masks)
    return batch


def concept_embedder(e):
    """A compiled ``(trainable, pixels [H, W, 3]) -> v*`` for ``e``: ``v_class + s * E(x)``
    from the clean image (latent at t = 0), ``[D]`` float32. Build it once, call it often."""
    import jax
    import jax.numpy as jnp

    from e4t_jax.e4t import offsets as offsets_lib
    from e4t_jax.training.steps import encode_concept

    @jax.jit
    def run(trainable, frozen, pixels):
        unet_params = offsets_lib.apply_offsets(frozen["unet"], trainable["offsets"], e.model.offsets)
        mean, _ = e.model.vae.apply({"params": frozen["vae"]}, pixels, method=e.model.vae.encode)
        latents = mean.astype(jnp.float32) * e.model.vae_scaling
        offset = encode_concept(e.model, trainable, frozen, unet_params, pixels, latents, jnp.zeros((1,), jnp.int32))
        return frozen["class_embedding"] + e.model.encoder_config.embedding_scale * offset[0]

    return lambda trainable, pixels: np.asarray(run(trainable, e.frozen, pixels[None]))


def concept_embedding(e, trainable, image_pixels: np.ndarray) -> np.ndarray:
    """``v*`` of one clean image ``[H, W, 3]`` in [-1, 1] (see :func:`concept_embedder`)."""
    return concept_embedder(e)(trainable, image_pixels)


def image_features(e, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """What per-step re-encoding at generation needs from the clean image.

    Returns ``clip_tokens`` ``[T, Dv]`` (the tapped CLIP [CLS] tokens) and ``latents``
    ``[h, w, c]`` (scaled VAE posterior mean), float32.
    """
    import jax

    from e4t_jax.e4t.encoder import clip_class_tokens
    from e4t_jax.training.steps import clip_pixels

    @jax.jit
    def run(frozen, pixels):
        vision_cfg = e.model.vision.config
        out = e.model.vision.apply({"params": frozen["vision"]}, clip_pixels(pixels, vision_cfg.image_size),
                                   output_hidden_states=True)
        mean, _ = e.model.vae.apply({"params": frozen["vae"]}, pixels, method=e.model.vae.encode)
        return clip_class_tokens(out.hidden_states, e.model.encoder_config.clip_layer_stride)[0], \
            mean[0] * e.model.vae_scaling

    tokens, latents = run(e.frozen, pixels[None])
    return {"clip_tokens": np.asarray(tokens, np.float32), "latents": np.asarray(latents, np.float32)}


def _validate(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.batch_size < 1:
        raise cli.UserError("--steps and --batch-size must be at least 1")
    if args.out.suffix != ".safetensors":
        raise cli.UserError(f"--out {args.out} must end in .safetensors")
    if not args.encoder.is_dir():
        raise cli.UserError(f"encoder folder {args.encoder} does not exist; pre-train one with e4t-pretrain")


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _validate(args)
    image = read_image(args.image)
    mask = read_image(args.mask) if args.mask is not None else None
    cli.reexec_with_fast_malloc()
    cli.enable_compilation_cache(args.cache_dir)
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from e4t_jax import pipeline
    from e4t_jax.e4t import concept as concept_lib
    from e4t_jax.e4t import model as model_lib
    from e4t_jax.training import steps
    from e4t_jax.training.data import center_crop_resize, load_templates

    timings, start = {}, time.perf_counter()
    try:
        e = model_lib.load_pretrained(args.model, args.encoder, clip_vision=args.clip_vision,
                                      placeholder=args.placeholder, dtype=jnp.dtype(args.dtype))
    except ValueError as error:
        raise cli.UserError(str(error)) from error
    previews = [p.format(e.placeholder) for p in (args.preview_prompt or DEFAULT_PREVIEW)]
    try:
        e.tokenizer.require_placeholder(previews, e.placeholder)
    except ValueError as error:
        raise cli.UserError(str(error)) from error
    size = e.sd.unet.config.sample_size * e.sd.downsample_factor
    rng = np.random.default_rng(args.seed)
    templates = load_templates({"face": "face", "cat": "cat"}.get(e.domain_word, "generic"))
    prompts = [templates[i % len(templates)].format(e.placeholder) for i in range(args.batch_size)]
    input_ids = e.tokenizer.encode(prompts)
    trainable = e.trainable if args.tune_encoder else {"offsets": e.trainable["offsets"]}
    frozen = e.frozen if args.tune_encoder else {**e.frozen, "head": e.trainable["head"]}
    optimizer = steps.make_optimizer(args.lr)
    state = steps.TrainState.create(jax.device_put(trainable), optimizer, jax.random.PRNGKey(args.seed))
    frozen = jax.device_put(frozen)
    log.info("%s; tuning %s", e.describe(), "encoder head + offsets" if args.tune_encoder else "offsets only")
    timings["load"] = time.perf_counter() - start

    def batch_at():
        return {**augmented_batch(image, size=size, batch_size=args.batch_size, rng=rng, mask=mask),
                "input_ids": input_ids}

    start = time.perf_counter()
    first = batch_at()
    step = jax.jit(functools.partial(steps.tune_step, model=e.model, optimizer=optimizer), donate_argnums=(0,))
    step = step.lower(state, frozen, first).compile()
    evaluate = jax.jit(functools.partial(steps.e4t_loss, model=e.model)).lower(
        state.params, frozen, first, jax.random.PRNGKey(1)).compile()
    timings["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    loss_before = float(evaluate(state.params, frozen, first, jax.random.PRNGKey(1))[0])
    bar = tqdm(range(args.steps), desc="personalizing", unit="step")
    batch = first
    for i in bar:
        state, metrics = step(state, frozen, batch)
        batch = batch_at() if i + 1 < args.steps else None  # augment on the host while the step runs
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    loss_after = float(evaluate(state.params, frozen, first, jax.random.PRNGKey(1))[0])
    timings["tune"] = time.perf_counter() - start
    if not np.isfinite(loss_after):
        raise cli.UserError("the tuning loss became NaN/inf; lower --lr")
    log.info("tuning loss on a fixed batch and noise: %.5f -> %.5f", loss_before, loss_after)

    tuned = {**{k: frozen[k] for k in ("head",) if k in frozen}, **state.params}
    clean = center_crop_resize(image, size)
    embedding = concept_embedding(e, tuned, clean)
    concept_lib.save_concept(
        args.out, embedding=embedding, offsets=jax.device_get(tuned["offsets"]), offset_config=e.model.offsets,
        sd=e.sd, domain_word=e.domain_word, placeholder=e.placeholder,
        head=jax.device_get(tuned["head"]) if args.save_encoder and args.tune_encoder else None,
        image=image_features(e, clean),
        extra={"image": args.image.name, "steps": args.steps, "lr": args.lr, "loss_before": loss_before,
               "loss_after": loss_after, "encoder": dataclasses.asdict(e.model.encoder_config)})
    log.info("wrote %s (%.1f KiB)", args.out, args.out.stat().st_size / 1024)

    if not args.no_preview:
        start = time.perf_counter()
        generator = pipeline.Generator(e.sd)
        concept = pipeline.Concept(e.model.placeholder_id, embedding, tuned["offsets"], e.model.offsets.kind)
        images = generator(e.base_params, e.tokenizer.encode(previews), e.tokenizer.encode([""] * len(previews)),
                           seed=args.seed, num_steps=args.preview_steps, concepts=(concept,))
        from PIL import Image

        grid = pipeline.image_grid(pipeline.to_uint8(np.concatenate([(center_crop_resize(image, size)[None] + 1) / 2,
                                                                     images])))
        Image.fromarray(grid).save(args.out.with_suffix(".png"))
        timings["preview"] = time.perf_counter() - start
        log.info("preview grid (input image first): %s", args.out.with_suffix(".png"))
    timings["total"] = sum(timings.values())
    log.info("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
