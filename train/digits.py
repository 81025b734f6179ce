"""Train the digits mini-domain base model on a CPU: VAE, vision tower, U-Net + text encoder.

    python -m train.digits --out runs/digits            # all stages, then runs/digits/model
    python -m train.digits --out runs/digits --stage vae

Every stage resumes from its latest orbax checkpoint when run again with the same
``--out`` (which must be new, empty, or such a run folder). The stages and their reasons
are documented in :mod:`e4t_jax.recipes.digits`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from e4t_jax import cli, files, weights
from e4t_jax.errors import UserError
from e4t_jax.recipes import digits as digits_recipe

STAGE_NAMES = ("vae", "vision", "base")
RUN_ENTRIES = frozenset(STAGE_NAMES + ("tokenizer", "model"))  # what a run folder holds


def parse_args(argv: list[str] | None):
    p = cli.ArgumentParser(prog="python -m train.digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (stages resume from it)")
    p.add_argument("--stage", choices=STAGE_NAMES + ("all",), default="all")
    p.add_argument("--base-steps", type=cli.POSITIVE, default=digits_recipe.STAGES["base"].steps,
                   help="U-Net + text encoder training steps")
    p.add_argument("--base-batch-size", type=cli.POSITIVE, default=digits_recipe.STAGES["base"].batch_size)
    p.add_argument("--seed", type=cli.SEED, default=0)
    return p.parse_args(argv)


def _done(out: Path, stage: str) -> bool:
    return (out / stage / "final.safetensors").is_file()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files.check_folder(args.out, RUN_ENTRIES, "train.digits")
    cli.reexec_with_fast_malloc()
    out = args.out
    wanted = STAGE_NAMES if args.stage == "all" else (args.stage,)
    base_stage = dataclasses.replace(digits_recipe.STAGES["base"], steps=args.base_steps,
                                     batch_size=args.base_batch_size)
    if "vae" in wanted and not _done(out, "vae"):
        digits_recipe.run_vae(out, args.seed)
    if "vision" in wanted and not _done(out, "vision"):
        digits_recipe.run_vision(out, args.seed)
    if "base" in wanted:
        if not _done(out, "vae"):
            raise UserError(f"train the VAE first: python -m train.digits --out {out} --stage vae")
        vae = weights.load_pytree(out / "vae" / "final.safetensors")
        scale_file = out / "vae" / "scaling_factor.json"
        if not scale_file.is_file():
            scale_file.write_text(json.dumps({"scaling_factor": digits_recipe.latent_scale(vae, args.seed)}))
        scale = json.loads(scale_file.read_text())["scaling_factor"]
        if not _done(out, "base"):
            digits_recipe.run_base(out, vae, scale, args.seed, base_stage)
    if all(_done(out, s) for s in STAGE_NAMES):
        base = weights.load_pytree(out / "base" / "final.safetensors")
        params = {"unet": base["unet"], "text": base["text"],
                  "vae": weights.load_pytree(out / "vae" / "final.safetensors"),
                  "vision": weights.load_pytree(out / "vision" / "final.safetensors")["vision"]}
        scale = json.loads((out / "vae" / "scaling_factor.json").read_text())["scaling_factor"]
        print(f"wrote the digits model to {digits_recipe.write_model(out / 'model', params, scale)}")
    return 0


main = cli.main_wrapper(main)

if __name__ == "__main__":
    raise SystemExit(main())
