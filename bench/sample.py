"""Sampling throughput: our compiled text-to-image pipeline vs diffusers' PyTorch pipeline.

    python bench/sample.py [--presets tiny medium] [--processes 3] [--runs 3] [--torch-threads N]

For each preset of :mod:`e4t_jax.presets` it writes the model folder once, draws one set
of initial latents, then measures both frameworks on the same prompts, latents, DDIM
steps and guidance scale:

* ours: :class:`e4t_jax.pipeline.Generator`, compiled once (timed), one warm-up
  call, then the median of ``--runs`` timed calls (tokenization included, images
  returned to the host as numpy);
* diffusers: ``StableDiffusionPipeline`` with ``DDIMScheduler`` under
  ``torch.inference_mode()`` on ``--torch-threads`` threads (default: every core the
  process may use, as XLA:CPU), one warm-up call, then the median of ``--runs`` timed
  calls (``output_type="np"``).

Each framework is measured in ``--processes`` fresh processes (the two alternating)
and the table reports the median over processes (see :mod:`bench.common`). Every
process runs with huge-page malloc. The mean absolute difference between the two
frameworks' images (pixels in [0, 1]) shows that both computed the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cores, ensure_hugepages, run_child  # noqa: E402

PROMPTS = ("a photo of a cat", "an oil painting of a dog")
FRAMEWORKS = ("jax", "torch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    p.add_argument("--batch", type=int, default=2, help="images per call (prompts cycle through a fixed list)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--runs", type=int, default=3, help="timed calls per process")
    p.add_argument("--processes", type=int, default=3, help="fresh processes per framework and preset")
    p.add_argument("--torch-threads", type=int, default=cores(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--child", choices=("prepare", *FRAMEWORKS), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(folder: Path, preset: str, batch: int) -> dict:
    """Writes the preset's model to ``folder/model`` and ``[B, C, h, w]`` latents to ``folder/latents.npy``."""
    from e4t_jax import presets

    model_dir = presets.write_model(folder / "model", preset)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    shape = (batch, unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"])
    np.save(folder / "latents.npy", np.random.default_rng(0).standard_normal(shape, np.float32))
    return {}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def run_jax(folder: Path, prompts: list[str], latents_nchw: np.ndarray,
            args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Times our Generator (XLA:CPU uses every core; ``--torch-threads`` does not apply).

    Returns:
      ``{"first_s": compile seconds, "times": [seconds per call], "backend"}`` and the
      ``[B, H, W, 3]`` float32 images.
    """
    import jax

    from e4t_jax import pipeline

    model, params, tokenizer = pipeline.load_model(folder / "model")
    params = jax.device_put(params)
    generator = pipeline.Generator(model)
    kwargs = dict(latents=latents_nchw.transpose(0, 2, 3, 1), num_steps=args.steps, guidance=args.guidance,
                  sampler="ddim")

    def sample() -> np.ndarray:
        return generator(params, tokenizer.encode(prompts), tokenizer.encode([""] * len(prompts)), **kwargs)

    compile_s, _ = _timed(lambda: generator.compile(params, tokenizer.encode(prompts),
                                                    tokenizer.encode([""] * len(prompts)), **kwargs))
    images = sample()
    times = [_timed(sample)[0] for _ in range(args.runs)]
    return {"first_s": compile_s, "times": times, "backend": jax.default_backend()}, images


def run_torch(folder: Path, prompts: list[str], latents_nchw: np.ndarray,
              args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Times diffusers' pipeline on ``--torch-threads`` threads.

    Returns:
      ``{"first_s": warm-up seconds, "times": [seconds per call], "backend"}`` and the
      ``[B, H, W, 3]`` float32 images.
    """
    import diffusers
    import torch

    torch.set_num_threads(args.torch_threads)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder / "model", safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(latents_nchw)

    def sample() -> np.ndarray:
        return pipe(prompts, latents=latents, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    output_type="np").images

    with torch.inference_mode():
        warmup_s, images = _timed(sample)
        times = [_timed(sample)[0] for _ in range(args.runs)]
    return {"first_s": warmup_s, "times": times, "backend": "cpu"}, images


def child(args: argparse.Namespace) -> dict:
    """One fresh process: prepares the preset's folder, or times one framework and saves its images."""
    if args.child == "prepare":
        return prepare(args.folder, args.preset, args.batch)
    latents = np.load(args.folder / "latents.npy")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(latents))]
    result, images = (run_jax if args.child == "jax" else run_torch)(args.folder, prompts, latents, args)
    np.save(args.images, np.asarray(images, np.float32))
    return result


def bench_preset(preset: str, folder: Path, args: argparse.Namespace) -> dict:
    """Measures both frameworks on one preset; returns the row of the table."""
    shared = ["--folder", str(folder), "--preset", preset, "--batch", str(args.batch), "--steps", str(args.steps),
              "--guidance", str(args.guidance), "--runs", str(args.runs), "--torch-threads", str(args.torch_threads)]
    run_child(["--child", "prepare", *shared])
    results: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for process in range(args.processes):
        for name in FRAMEWORKS:
            images = folder / f"{name}-{process}.npy"
            results[name].append(run_child(["--child", name, "--images", str(images), *shared]))
            print(f"  {preset} {name} process {process}: first call {results[name][-1]['first_s']:.2f} s, "
                  f"runs {', '.join(f'{t:.3f}' for t in results[name][-1]['times'])} s", flush=True)
    images = {name: np.load(folder / f"{name}-0.npy") for name in FRAMEWORKS}
    per_process = {name: [args.batch / statistics.median(r["times"]) for r in results[name]] for name in FRAMEWORKS}
    difference = np.abs(images["jax"] - images["torch"])
    return {
        "preset": preset, "size": images["jax"].shape[1], "batch": args.batch, "steps": args.steps,
        "jax": statistics.median(per_process["jax"]), "torch": statistics.median(per_process["torch"]),
        "per_process": per_process, "backend": results["jax"][0]["backend"],
        "compile_s": statistics.median(r["first_s"] for r in results["jax"]),
        "mean_abs_diff": float(difference.mean()), "max_abs_diff": float(difference.max()),
        "image_std": float(images["torch"].std()),
    }


def print_table(rows: list[dict]) -> None:
    header = ("preset", "image", "batch", "steps", "jax img/s", "torch img/s", "jax/torch", "jax compile s")
    lines = [header] + [(r["preset"], f"{r['size']}x{r['size']}", str(r["batch"]), str(r["steps"]),
                         f"{r['jax']:.3f}", f"{r['torch']:.3f}", f"{r['jax'] / r['torch']:.2f}x",
                         f"{r['compile_s']:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        spread = "; ".join(f"{name} " + ", ".join(f"{v:.3f}" for v in r["per_process"][name]) for name in FRAMEWORKS)
        print(f"{r['preset']}: img/s per process: {spread}")
        print(f"{r['preset']}: same latents -> mean |jax - torch| = {r['mean_abs_diff']:.2e}, "
              f"max = {r['max_abs_diff']:.2e} (pixels in [0, 1]; image std {r['image_std']:.3f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    ensure_hugepages()
    print(f"sampling bench: {cores()} cores, {args.processes} processes x {args.runs} runs per framework, "
          f"torch threads {args.torch_threads}, GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="e4t-bench-sample-") as tmp:
        rows = []
        for preset in args.presets:
            (Path(tmp) / preset).mkdir()
            rows.append(bench_preset(preset, Path(tmp) / preset, args))
    print(f"ours on JAX backend {rows[0]['backend']}; diffusers on torch CPU")
    print_table(rows)
    print(f"bench wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
