"""What a user waits for: personalization and generation through the CLIs, first and second run, vs PyTorch.

    python bench/personalize.py [--presets tiny medium] [--steps 15] [--batch-size 16]

For each preset of :mod:`e4t_jax.presets` (model and a random, not pre-trained ``face``
domain encoder written under a temporary ``$E4T_HOME``; the astronaut photo of
scikit-image saved as a PNG; a fresh, empty compilation cache) it runs, each in a
fresh process:

* ours, twice (the second run finds the first one's compiled programs in the
  ``--cache-dir``): ``e4t-personalize --steps S --batch-size B --no-preview``, then
  ``e4t-generate`` with the concept on 2 prompts, 20 DDIM steps. The CLIs' own
  ``timings:`` lines give load / compile / tune (or sample); the wall time of the
  whole process (Python and JAX import, writing the outputs) is measured here;
* PyTorch: :class:`bench.torch_e4t.TorchE4T` tuning the same initial head and offsets
  on the same augmented batches and prompts as ``e4t-personalize`` (batches prepared
  beforehand), with the same loss evaluations before and after; then diffusers'
  ``StableDiffusionPipeline`` with ``DDIMScheduler`` on the same 2 prompts, 20 steps,
  the concept's ``v*`` added with ``load_textual_inversion`` (its weight offsets are
  not applied: merged weights cost the same).

If PyTorch's personalization would take longer than ``--torch-budget`` seconds (judged
after its second step), it stops after ``--fallback-steps`` steps and ours runs that
many steps too; the table says so. One process per measurement (no medians: the whole
bench must fit in ~15 minutes). Huge-page malloc and
``OMP_WAIT_POLICY=PASSIVE`` for every process unless set otherwise (for PyTorch's
threads on a shared machine, see ``bench/train_step.py``; XLA:CPU does not use OpenMP).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cores, ensure_hugepages, run_child  # noqa: E402

PROMPTS = ("a photo of S*", "an oil painting of S*")
GENERATE_STEPS = 20
LEARNING_RATE = 1e-5  # e4t-personalize's default --lr
TIMINGS = re.compile(r"timings: (.*)")
LOSS = re.compile(r"tuning loss on a fixed batch and noise: ([-\d.e+naif]+) -> ([-\d.e+naif]+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    p.add_argument("--steps", type=int, default=15, help="personalization steps")
    p.add_argument("--batch-size", type=int, default=16, help="augmented copies per personalization step")
    p.add_argument("--torch-budget", type=float, default=300.0,
                   help="seconds a PyTorch personalization may take before both fall back to --fallback-steps")
    p.add_argument("--fallback-steps", type=int, default=5)
    p.add_argument("--torch-threads", type=int, default=cores(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--child", choices=("prepare", "torch-tune", "torch-generate"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- children (fresh processes)

def prepare(folder: Path, preset: str, args: argparse.Namespace) -> dict:
    """Writes the preset model and encoder (under ``$E4T_HOME``), ``astronaut.png``, and for
    PyTorch the initial trainables, encoder config, augmented batches and prompts."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from bench.torch_e4t import jax_trainables_to_torch
    from e4t_jax import config as config_lib, presets
    from e4t_jax.e4t.pretrained import load_pretrained, preset_encoder_dir
    from e4t_jax.training.data import augmented_batch, prompts_for, read_image, templates_for_domain

    model_dir, encoder_dir = presets.preset_dir(preset), preset_encoder_dir(preset, "face")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    e = load_pretrained(preset, encoder_dir)
    np.savez(folder / "trainable.npz", **jax_trainables_to_torch(e.params))
    (folder / "encoder.json").write_text(json.dumps(config_lib.to_dict(e.config.encoder)))
    # The batches e4t-personalize draws: seed 0, one call of augmented_batch per step.
    image, rng = read_image(folder / "astronaut.png"), np.random.default_rng(0)
    size = e.sd.image_size
    pixels = np.stack([augmented_batch(image, size=size, batch_size=args.batch_size, rng=rng)["pixels"]
                       for _ in range(args.steps)])
    np.save(folder / "pixels.npy", pixels)
    placeholder = e.config.model.placeholder
    prompts = prompts_for(templates_for_domain("face"), placeholder, args.batch_size)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return {"model": str(model_dir), "encoder": str(encoder_dir), "placeholder": placeholder, "size": size}


def torch_tune(folder: Path, args: argparse.Namespace, started: float) -> dict:
    """PyTorch personalization as e4t-personalize does it: load, loss before, steps, loss after.

    Returns seconds: ``load``, ``tune`` (steps and both loss evaluations), per-step
    ``step_times``, the steps run and the losses.
    """
    import numpy as np
    import torch

    from bench.torch_e4t import TorchE4T

    torch.set_num_threads(args.torch_threads)
    info = json.loads((folder / "prepare.json").read_text())
    start = time.perf_counter()
    reference = TorchE4T(info["model"], json.loads((folder / "encoder.json").read_text()),
                         dict(np.load(folder / "trainable.npz")), placeholder=info["placeholder"])
    optimizer = reference.make_optimizer(LEARNING_RATE)
    pixels = torch.from_numpy(np.load(folder / "pixels.npy")).permute(0, 1, 4, 2, 3).contiguous()
    input_ids = reference.encode_prompts(json.loads((folder / "prompts.json").read_text()))
    generator = torch.Generator().manual_seed(0)
    fixed_noise = reference.draw_noise(pixels[0], generator)
    load_s = time.perf_counter() - start

    def fixed_loss() -> float:
        with torch.no_grad():
            return reference.loss(pixels[0], input_ids, *fixed_noise)[0].item()

    start = time.perf_counter()
    loss_before, steps, step_times = fixed_loss(), args.steps, []
    while len(step_times) < steps:
        i, step_start = len(step_times), time.perf_counter()
        reference.train_step(optimizer, pixels[i], input_ids, *reference.draw_noise(pixels[i], generator))
        step_times.append(time.perf_counter() - step_start)
        projected = time.perf_counter() - started + (steps - i - 1) * step_times[-1]
        if i == 1 and projected > args.torch_budget:
            steps = args.fallback_steps
    loss_after = fixed_loss()
    tune_s = time.perf_counter() - start
    return {"load": load_s, "tune": tune_s, "total": load_s + tune_s, "step_times": step_times, "steps": steps,
            "loss": [loss_before, loss_after]}


def torch_generate(folder: Path, args: argparse.Namespace) -> dict:
    """diffusers' pipeline with the concept's ``v*`` (no offsets): load, first and second sample call."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.torch_threads)
    info = json.loads((folder / "prepare.json").read_text())
    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(info["model"], safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embedding = load_file(folder / "concept-1.safetensors")["embedding"]
    pipe.load_textual_inversion({info["placeholder"]: embedding}, token=info["placeholder"])
    load_s = time.perf_counter() - start

    def sample() -> float:
        start = time.perf_counter()
        pipe(list(PROMPTS), num_inference_steps=GENERATE_STEPS, guidance_scale=7.5, output_type="np",
             generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    with torch.inference_mode():
        first, second = sample(), sample()
    return {"load": load_s, "sample": first, "sample_again": second}


# ---------------------------------------------------------------- parent

def run_cli(command: list[str]) -> tuple[float, str]:
    """Runs a CLI in a fresh process; returns its wall time and its output (stdout + stderr)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return wall, output


def cli_timings(output: str) -> dict:
    """``{"load": s, "compile": s, ...}`` from a CLI's last ``timings:`` line."""
    line = TIMINGS.findall(output)[-1]
    return {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)s", line)}


def cli_path(name: str) -> str:
    """The console script installed beside this Python (not a version-manager shim)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


def bench_preset(preset: str, folder: Path, args: argparse.Namespace) -> dict:
    """Every measurement of one preset; returns ``{"ours": [run1, run2], "torch": {...}, ...}``."""
    shared = ["--folder", str(folder), "--preset", preset, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--torch-threads", str(args.torch_threads),
              "--torch-budget", str(args.torch_budget), "--fallback-steps", str(args.fallback_steps)]
    info = run_child(["--child", "prepare", *shared])
    (folder / "prepare.json").write_text(json.dumps(info))
    start = time.perf_counter()
    tune = run_child(["--child", "torch-tune", *shared])
    tune["wall"] = time.perf_counter() - start
    steps = tune["steps"]
    print(f"  {preset} torch personalize: {steps} steps, {tune['wall']:.1f} s wall", flush=True)

    cache, ours = folder / "xla-cache", []
    for run in (1, 2):
        concept, images = folder / f"concept-{run}.safetensors", folder / f"images-{run}"
        wall, output = run_cli([cli_path("e4t-personalize"), "--model", preset, "--encoder", info["encoder"],
                                "--image", str(folder / "astronaut.png"), "--steps", str(steps),
                                "--batch-size", str(args.batch_size), "--no-preview", "--out", str(concept),
                                "--cache-dir", str(cache), "--force"])
        personalize = {**cli_timings(output), "wall": wall, "loss": [float(x) for x in LOSS.findall(output)[-1]]}
        print(f"  {preset} ours personalize run {run}: {personalize}", flush=True)
        prompts = [flag for prompt in PROMPTS for flag in ("--prompt", prompt)]
        wall, output = run_cli([cli_path("e4t-generate"), "--model", preset,
                                "--concept", str(folder / "concept-1.safetensors"), *prompts,
                                "--steps", str(GENERATE_STEPS), "--cache-dir", str(cache), "--out", str(images),
                                "--force"])
        generate = {**cli_timings(output), "wall": wall}
        print(f"  {preset} ours generate run {run}: {generate}", flush=True)
        ours.append({"personalize": personalize, "generate": generate})

    start = time.perf_counter()
    generate = run_child(["--child", "torch-generate", *shared])
    generate["wall"] = time.perf_counter() - start
    print(f"  {preset} torch generate: {generate}", flush=True)
    return {"preset": preset, "size": info["size"], "steps": steps, "ours": ours,
            "torch": {"personalize": tune, "generate": generate}}


ROWS = (("personalize", "load"), ("personalize", "compile"), ("personalize", "tune"),
        ("personalize", "total"), ("personalize", "wall"),
        ("generate", "load"), ("generate", "compile"), ("generate", "sample"), ("generate", "wall"))


def table(results: list[dict], args: argparse.Namespace) -> str:
    """The markdown table: seconds, and torch / ours (above 1: ours is faster)."""
    lines = ["| preset | stage | ours 1st run s | ours 2nd run s | torch s | torch / ours 1st | torch / ours 2nd |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        steps = f"{r['steps']} steps" + (f" (not {args.steps}: torch over {args.torch_budget:.0f} s)"
                                         if r["steps"] != args.steps else "")
        label = f"{r['preset']} ({r['size']} px; {steps}, batch {args.batch_size})"
        for stage, key in ROWS:
            first, second = r["ours"][0][stage].get(key), r["ours"][1][stage].get(key)
            torch_s = r["torch"][stage].get(key)
            cells = [f"{v:.2f}" if v is not None else "-" for v in (first, second, torch_s)]
            ratios = [f"{torch_s / v:.2f}" if torch_s is not None and v else "-" for v in (first, second)]
            lines.append(f"| {label} | {stage} {key} | " + " | ".join(cells + ratios) + " |")
            label = ""
    return "\n".join(lines)


def details(results: list[dict]) -> str:
    """Per-step times, losses and second sampling calls, one line per preset."""
    out = []
    for r in results:
        t, o = r["torch"], r["ours"]
        step_ms = ", ".join(f"{1e3 * s:.0f}" for s in t["personalize"]["step_times"])
        out.append(f"- {r['preset']}: torch step ms: {step_ms}; ours tune / steps: "
                   + ", ".join(f"{1e3 * run['personalize']['tune'] / r['steps']:.0f}" for run in o)
                   + " ms (includes 2 loss evaluations and augmentation)."
                   + " Loss before -> after: ours " + "; ".join("{:.4f} -> {:.4f}".format(*run["personalize"]["loss"])
                                                              for run in o)
                   + ", torch {:.4f} -> {:.4f}.".format(*t["personalize"]["loss"])
                   + f" torch second sample call {t['generate']['sample_again']:.2f} s.")
    return "\n".join(out)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        started = time.perf_counter()
        folder = args.folder
        if args.child == "prepare":
            result = prepare(folder, args.preset, args)
        elif args.child == "torch-tune":
            result = torch_tune(folder, args, started)
        else:
            result = torch_generate(folder, args)
        print(json.dumps(result))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for torch; XLA:CPU does not use OpenMP
    ensure_hugepages()
    started, load_before = time.perf_counter(), uptime()
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    print(f"personalization bench: {cores()} cores, GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="e4t-bench-personalize-") as tmp:
        os.environ["E4T_HOME"] = str(Path(tmp) / "home")
        results = []
        for preset in args.presets:
            (Path(tmp) / preset).mkdir()
            results.append(bench_preset(preset, Path(tmp) / preset, args))
    command = " ".join(["python", *sys.argv])
    print(f"\nMeasured {date}, 2-core CPU, no GPU; load before: {load_before}; after: {uptime()}")
    print(f"\n    {command}\n")
    print(table(results, args))
    print()
    print(details(results))
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
