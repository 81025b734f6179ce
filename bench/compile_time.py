"""Where compile time goes: per program of a personalization run, per pass, and per module.

    python bench/compile_time.py --model medium [--cache-dir DIR] [--modules]

Runs ``e4t-personalize``'s own function (:func:`e4t_jax.recipes.personalize.personalize_file`,
``--steps`` steps at batch 16 with a random ``face`` encoder, a 1-prompt preview) in this
process with JAX's monitoring events recorded, and prints per program (``jit`` function):
tracing (Python -> jaxpr), lowering (jaxpr -> StableHLO) and the backend (XLA compile,
or reading the persistent cache: then the row says ``hit``), beside the run's own
``timings``. Run it twice with the same ``--cache-dir`` to see a warm cache.

``--modules`` then compiles each module alone at the run's shapes (U-Net forward +
backward and forward, text encoder, vision tower, VAE encoder and decoder), without a
cache, to show which module the backend time belongs to. XLA options come from
``XLA_FLAGS`` (e.g. ``--xla_backend_optimization_level=1``), as usual.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PASSES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "backend"}


def record_passes() -> dict[str, dict[str, float]]:
    """``{function name: {pass: seconds}}``, filled from now on by JAX's monitoring events."""
    import jax

    seconds = collections.defaultdict(lambda: collections.defaultdict(float))

    def listen(event: str, duration: float, **kwargs):
        if event in PASSES:
            seconds[str(kwargs.get("fun_name", "?"))][PASSES[event]] += duration
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
            seconds["(cache reads)"]["backend"] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    return seconds


def personalization_run(model: str, steps: int, cache_dir: Path | None) -> tuple[dict, dict]:
    """``(per-program passes, the run's timings)`` of one personalization from a fresh process."""
    import numpy as np
    from skimage import data as photos

    from e4t_jax import files, runtime
    from e4t_jax.e4t.pretrained import preset_encoder_dir
    from e4t_jax.recipes.personalize import personalize_file

    if cache_dir is not None:
        runtime.enable_compilation_cache(cache_dir)
    work = Path(tempfile.mkdtemp())
    photo = work / "astronaut.png"
    files.save_image(np.asarray(photos.astronaut()), photo)
    encoder = preset_encoder_dir(model)
    seconds = record_passes()
    timings = personalize_file(model, encoder, photo, work / "me.safetensors", steps_count=steps, batch_size=16,
                               preview_prompts=["a photo of {}"], preview_steps=25)
    return {name: dict(p) for name, p in seconds.items()}, timings


def module_programs(model: str) -> dict[str, tuple]:
    """``{module: (function, args)}`` of each module alone at a personalization's shapes."""
    import jax
    import jax.numpy as jnp

    from e4t_jax.e4t.model import build
    from e4t_jax.e4t.config import E4TConfig, ModelConfig

    e = build(E4TConfig(model=ModelConfig(base=model, domain_word="face")))
    sd, frozen = e.sd, e.frozen
    size, batch = sd.image_size, 16
    side = size // sd.downsample_factor
    latent = jnp.zeros((batch, side, side, sd.latent_channels))
    t = jnp.zeros((batch,), jnp.int32)
    context = jnp.zeros((batch, 77, sd.unet.config.cross_attention_dim))
    ids = jnp.zeros((batch, 77), jnp.int32)
    pixels = jnp.zeros((batch, size, size, 3))

    def unet_loss(p):
        return jnp.mean(sd.unet.apply({"params": p}, latent, t, context) ** 2)

    return {
        "U-Net forward + backward": (jax.grad(unet_loss), (frozen.unet,)),
        "U-Net forward": (unet_loss, (frozen.unet,)),
        "text encoder forward": (lambda p: sd.text.encode(p, ids, sd.text.embed(p, ids)), (frozen.text,)),
        "vision tower forward": (lambda p: e.model.vision(p, pixels)[0], (frozen.vision,)),
        "VAE encoder forward": (lambda p: sd.vae.apply({"params": p}, pixels, method=sd.vae.encode), (frozen.vae,)),
        "VAE decoder forward": (lambda p: sd.vae.apply({"params": p}, latent, method=sd.vae.decode), (frozen.vae,)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="medium", help="a random preset")
    parser.add_argument("--steps", type=int, default=1, help="tuning steps of the run")
    parser.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache (default: none)")
    parser.add_argument("--modules", action="store_true", help="also compile each module alone")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    seconds, timings = personalization_run(args.model, args.steps, args.cache_dir)
    print(f"personalization on {args.model} ({args.steps} steps, batch 16, 1-prompt preview), "
          f"{time.perf_counter() - start:.1f} s; its timings: "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print("\n| program | trace s | lower s | backend s |\n|---|---|---|---|")
    totals = collections.Counter()
    for name, passes in sorted(seconds.items(), key=lambda kv: -sum(kv[1].values())):
        totals.update(passes)
        print(f"| {name} | " + " | ".join(f"{passes.get(p, 0.0):.2f}" for p in ("trace", "lower", "backend")) + " |")
    print("| **all** | " + " | ".join(f"**{totals[p]:.2f}**" for p in ("trace", "lower", "backend")) + " |")
    if args.modules:
        import jax

        print("\n| module alone | backend compile s |\n|---|---|")
        for name, (fn, fn_args) in module_programs(args.model).items():
            lowered = jax.jit(fn).lower(*fn_args)
            begin = time.perf_counter()
            lowered.compile()
            print(f"| {name} | {time.perf_counter() - begin:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
