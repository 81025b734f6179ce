"""DreamBooth / TI+DreamBooth baselines: fine-tune Stable Diffusion on 1-N images of a concept.

Examples::

    e4t-dreambooth --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data dog/ --class-word dog \
        --prior-preservation --steps 800 --out runs/dog-db
    e4t-dreambooth ... --lora-rank 4 --out runs/dog-lora          # low-rank offsets, a few MB
    e4t-dreambooth ... --textual-inversion --out runs/dog-ti-db    # also learn the S* embedding

Trains on the prompt "a photo of S* CLASS" (``--placeholder`` is the rare identifier),
with ``--prior-preservation`` plus a class loss on "a photo of a CLASS" images that our
own pipeline generates once and caches (``$E4T_HOME/class-images``). Writes ``--out`` as
a diffusers-format model folder that ``--model`` and ``StableDiffusionPipeline.from_pretrained``
load: the fine-tuned U-Net (and text encoder), the base model's other parts, with
``--lora-rank`` also ``lora.safetensors`` (the offsets alone), with ``--textual-inversion``
also ``learned_embeds.safetensors`` and ``concept.safetensors``
(``e4t-generate --model OUT --concept OUT/concept.safetensors``), and ``dreambooth.json``.
``--out`` must be new or empty; ``--force`` replaces only a folder e4t-dreambooth wrote.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e4t_jax import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="e4t-dreambooth", description=__doc__.split("\n\n")[0])
    cli.add_model(p)
    p.add_argument("--data", type=Path, required=True, help="folder of 1-N images of the concept")
    p.add_argument("--placeholder", default="S*", help="the rare identifier in 'a photo of S* CLASS'")
    p.add_argument("--class-word", required=True, help="the concept's class noun (dog, face, cat)")
    p.add_argument("--steps", type=cli.POSITIVE, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=1,
                   help="instance images per step (prior preservation adds as many class images)")
    p.add_argument("--lr", type=cli.LEARNING_RATE, default=None,
                   help="learning rate (default: 5e-6 full fine-tune, 1e-4 with --lora-rank)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the data order, noise, offsets and class images")
    p.add_argument("--prior-preservation", action="store_true",
                   help="add the class loss on generated 'a photo of a CLASS' images")
    p.add_argument("--num-class-images", type=cli.NON_NEGATIVE, default=100,
                   help="class images (generated once, then reused from the cache)")
    p.add_argument("--class-steps", type=cli.integer(1, 1000), default=25,
                   help="denoising steps of each class image")
    p.add_argument("--prior-weight", type=cli.number(0), default=1.0, help="weight of the class loss")
    p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text encoder too")
    p.add_argument("--textual-inversion", action="store_true",
                   help="TI+DreamBooth: the placeholder is a new token whose embedding (init: the class word) "
                        "is learned too")
    p.add_argument("--embedding-lr", type=cli.LEARNING_RATE, default=5e-4,
                   help="learning rate of the placeholder's embedding (with --textual-inversion)")
    p.add_argument("--lora-rank", type=cli.NON_NEGATIVE, default=0,
                   help="train rank-R offsets of the attention projections instead of the whole U-Net (0: full)")
    p.add_argument("--remat", action="store_true", help="recompute U-Net blocks in the backward pass (less memory)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype, and the dtype the frozen weights are stored in (the trained stay float32)")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--force", action="store_true", help="replace a model folder that e4t-dreambooth wrote")
    return p.parse_args(argv)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.reexec_with_fast_malloc()
    from e4t_jax import runtime
    from e4t_jax.recipes.dreambooth import DreamBoothConfig, dreambooth_files

    config = DreamBoothConfig(
        class_word=args.class_word, placeholder=args.placeholder, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, prior_preservation=args.prior_preservation,
        num_class_images=args.num_class_images, class_steps=args.class_steps, prior_weight=args.prior_weight,
        train_text=args.train_text_encoder, textual_inversion=args.textual_inversion,
        embedding_lr=args.embedding_lr, lora_rank=args.lora_rank)
    runtime.enable_compilation_cache(args.cache_dir)
    dreambooth_files(args.model, args.data, args.out, config, remat=args.remat, dtype=args.dtype,
                     variant=args.variant, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
