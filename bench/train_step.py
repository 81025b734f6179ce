"""Speed of E4T's training step: e4t_jax (jit) against the PyTorch reference (eager).

    python bench/train_step.py [--workloads pretrain-tiny,pretrain-medium,tune-tiny] [--processes 3] [--only jax]

A step is the whole E4T update: VAE encode, CLIP vision, U-Net down/mid features,
encoder head, text encoder with ``v*``, U-Net, loss, backward, global-norm clipping
and AdamW on the encoder head and the weight offsets (the base model frozen). The
PyTorch side is :mod:`bench.torch_e4t`; both start from the same weights (a preset
model folder written by :func:`e4t_jax.presets.write_model`, the head and offsets that
:func:`e4t_jax.e4t.model.build` initializes) and the same images and prompts; each
draws its own noise.

Workloads:

* ``pretrain-tiny``: preset ``tiny``, 64x64 images, batch 4: images/s from the median
  step time after warm-up steps;
* ``pretrain-medium``: preset ``medium``, 256x256 images, batch 2;
* ``tune-tiny``: personalization, 15 steps at batch 16 of augmented copies of one
  photo (``skimage.data.astronaut``): wall time of the 15 steps from a fresh process
  (ours after compilation, whose time is reported apart; PyTorch's first-step
  warm-up included, as a user gets it);
* ``tune-medium``: the same tuning step on ``medium`` (256 px, batch 16), one warm-up
  step then 3 timed (the per-step median is the number to read; 15 steps would take
  minutes per process).

Each framework runs in ``--processes`` fresh processes (alternating); the tables show
the median over processes. ``torch/jax`` above 1 means ours is faster.

On a machine shared with other work, PyTorch's OpenMP threads spin-wait and lose most
of their time to oversubscription (a tiny step measured 1.4-2.5 s instead of 0.08 s);
there, run with ``OMP_WAIT_POLICY=PASSIVE`` (printed in the header) and re-measure on
an idle machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cores, ensure_hugepages, median_of, run_child  # noqa: E402

WORKLOADS = {
    "pretrain-tiny": dict(preset="tiny", size=64, batch=4, warmup=2, steps=5),
    "pretrain-medium": dict(preset="medium", size=256, batch=2, warmup=1, steps=3),
    "tune-tiny": dict(preset="tiny", size=64, batch=16, warmup=0, steps=15),
    "tune-medium": dict(preset="medium", size=256, batch=16, warmup=1, steps=3),
}
LEARNING_RATE = 1.6e-5
DOMAIN_WORD, PLACEHOLDER = "face", "S*"


def e4t_config(model_dir: Path):
    """The default E4T (head widths, offsets, loss) on a model folder, for the face domain."""
    from e4t_jax.e4t.config import E4TConfig, ModelConfig

    return E4TConfig(model=ModelConfig(base=str(model_dir), domain_word=DOMAIN_WORD, placeholder=PLACEHOLDER))


def prepare(folder: Path, names: list[str]) -> None:
    """Writes the preset models, the initial head and offsets (for torch), and every batch."""
    import numpy as np
    import skimage.data

    from bench.torch_e4t import jax_trainables_to_torch
    from e4t_jax import config as config_lib, presets
    from e4t_jax.e4t import model as model_lib
    from e4t_jax.training import data

    for preset in sorted({WORKLOADS[name]["preset"] for name in names}):
        presets.write_model(folder / preset, preset)
        e4t = model_lib.build(e4t_config(folder / preset))
        np.savez(folder / f"{preset}_trainable.npz", **jax_trainables_to_torch(e4t.params))
        (folder / f"{preset}_encoder.json").write_text(json.dumps(config_lib.to_dict(e4t.config.encoder)))
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    templates = data.PROMPT_TEMPLATES[DOMAIN_WORD]
    for name in names:
        spec, rng = WORKLOADS[name], np.random.default_rng(0)
        count = (spec["warmup"] + spec["steps"]) * spec["batch"]
        sources = [photos[0]] * count if name.startswith("tune") else [photos[i % len(photos)] for i in range(count)]
        pixels = np.stack([data.augment(photo, rng, spec["size"]) for photo in sources])
        prompts = [templates[i].format(PLACEHOLDER) for i in rng.integers(0, len(templates), count)]
        np.save(folder / f"{name}_pixels.npy", pixels.reshape(-1, spec["batch"], *pixels.shape[1:]))
        (folder / f"{name}_prompts.json").write_text(json.dumps(prompts))


def _prompts(folder: Path, name: str) -> list[list[str]]:
    batch = WORKLOADS[name]["batch"]
    prompts = json.loads((folder / f"{name}_prompts.json").read_text())
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


def _summary(name: str, times: list[float], compile_s: float | None = None) -> dict:
    """Per-workload numbers of one process: median and total of the timed steps (seconds in, ms/s out)."""
    import statistics

    timed = times[WORKLOADS[name]["warmup"]:]
    result = {f"{name}/step_ms": 1e3 * statistics.median(timed), f"{name}/total_s": sum(timed),
              f"{name}/first_ms": 1e3 * timed[0]}
    if compile_s is not None:
        result[f"{name}/compile_s"] = compile_s
    return result


def time_jax(folder: Path, names: list[str]) -> dict:
    """Our jit-compiled step (state donated); compile time measured apart."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from e4t_jax.e4t import model as model_lib
    from e4t_jax.training import steps
    from e4t_jax.training.config import OptimizerConfig

    results, built = {}, {}
    for name in names:
        spec = WORKLOADS[name]
        if spec["preset"] not in built:
            e4t = model_lib.build(e4t_config(folder / spec["preset"]))
            built[spec["preset"]] = (e4t, jax.device_put(e4t.frozen))
        e4t, frozen = built[spec["preset"]]
        optimizer = steps.make_optimizer(OptimizerConfig(lr=LEARNING_RATE))
        params = jax.tree.map(jnp.array, e4t.params)  # a copy: the step donates the state
        state = steps.TrainState.create(params, optimizer, jax.random.key(0))
        loss_fn = functools.partial(model_lib.loss, model=e4t.model)
        step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer), donate_argnums=0)
        pixels, batch_size = np.load(folder / f"{name}_pixels.npy"), spec["batch"]
        batches = [jax.device_put({"pixels": pixels[i], "input_ids": e4t.tokenizer.encode(prompts),
                                   "index": np.arange(batch_size, dtype=np.int32) + i * batch_size})
                   for i, prompts in enumerate(_prompts(folder, name))]
        start = time.perf_counter()
        compiled = step.lower(state, frozen, batches[0]).compile()
        compile_s = time.perf_counter() - start
        times = []
        for batch in batches:
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        results.update(_summary(name, times, compile_s))
    return results


def time_torch(folder: Path, names: list[str]) -> dict:
    """The PyTorch reference in eager mode, a fresh model per workload."""
    import numpy as np
    import torch

    from bench.torch_e4t import TorchE4T

    torch.set_num_threads(cores())
    results = {}
    for name in names:
        preset = WORKLOADS[name]["preset"]
        reference = TorchE4T(folder / preset, json.loads((folder / f"{preset}_encoder.json").read_text()),
                             dict(np.load(folder / f"{preset}_trainable.npz")),
                             placeholder=PLACEHOLDER, domain_word=DOMAIN_WORD)
        optimizer = reference.make_optimizer(LEARNING_RATE)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.from_numpy(np.load(folder / f"{name}_pixels.npy")).permute(0, 1, 4, 2, 3).contiguous()
        batches = [(pixels[i], reference.encode_prompts(prompts)) for i, prompts in enumerate(_prompts(folder, name))]
        times = []
        for images, input_ids in batches:
            start = time.perf_counter()
            noise, timesteps = reference.draw_noise(images, generator)
            reference.train_step(optimizer, images, input_ids, noise, timesteps)
            times.append(time.perf_counter() - start)
        results.update(_summary(name, times))
    return results


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(runs: dict[str, list[dict]], names: list[str], processes: int, load_before: str) -> None:
    frameworks = list(runs)
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {cores()} cores; "
          f"load before: {load_before}; after: {uptime()}")
    environment = ", ".join(f"{k}={os.environ.get(k)!r}" for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "OMP_WAIT_POLICY"))
    print(f"{environment}; median of {processes} processes; command: python {' '.join(sys.argv)}")
    for fw in frameworks:
        for key in runs[fw][0]:
            print(f"  {fw} {key} per process: " + ", ".join(f"{run[key]:.1f}" for run in runs[fw]))
    medians = {fw: median_of(runs[fw]) for fw in frameworks}
    nan = float("nan")
    jax_m, torch_m = medians.get("jax", {}), medians.get("torch", {})
    pretrain = [n for n in names if n.startswith("pretrain")]
    if pretrain:
        print("\n| workload | image | batch | jax ms/step | jax img/s | jax compile s | torch ms/step | torch img/s "
              "| torch/jax |\n|---|---|---|---|---|---|---|---|---|")
    for name in pretrain:
        size, batch = WORKLOADS[name]["size"], WORKLOADS[name]["batch"]
        j, t = jax_m.get(f"{name}/step_ms", nan), torch_m.get(f"{name}/step_ms", nan)
        compile_s = jax_m.get(f"{name}/compile_s", nan)
        print(f"| {name} | {size} | {batch} | {j:.0f} | {1e3 * batch / j:.1f} | {compile_s:.1f} | {t:.0f} | "
              f"{1e3 * batch / t:.1f} | {t / j:.2f} |")
    for name in (n for n in names if n.startswith("tune")):
        spec = WORKLOADS[name]
        j, c, t = (jax_m.get(f"{name}/total_s", nan), jax_m.get(f"{name}/compile_s", nan),
                   torch_m.get(f"{name}/total_s", nan))
        title = f"{name}: {spec['steps']} steps, batch {spec['batch']}, {spec['size']} px"
        j_step, t_step = jax_m.get(f"{name}/step_ms", nan), torch_m.get(f"{name}/step_ms", nan)
        print(f"\n| {title} | jax steps s | jax compile s | jax total s | torch s | torch/jax steps "
              "| torch/jax total | jax ms/step | torch ms/step | jax/torch per step |\n|---|---|---|---|---|---|---|---|---|---|")
        print(f"| | {j:.1f} | {c:.1f} | {j + c:.1f} | {t:.1f} | {t / j:.2f} | {t / (j + c):.2f} | {j_step:.0f} "
              f"| {t_step:.0f} | {j_step / t_step:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per framework")
    parser.add_argument("--only", choices=("jax", "torch"), help="time one framework only")
    parser.add_argument("--child", choices=("prepare", "jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.workloads.split(",")
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.child:
        folder = Path(args.folder)
        if args.child == "prepare":
            prepare(folder, names)
            print("{}")
        else:
            print(json.dumps((time_jax if args.child == "jax" else time_torch)(folder, names)))
        return

    ensure_hugepages()
    frameworks = [args.only] if args.only else ["jax", "torch"]
    started, load_before = time.perf_counter(), uptime()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--folder", tmp, "--workloads", args.workloads]
        run_child(["--child", "prepare", *common])
        runs = {fw: [] for fw in frameworks}
        for _ in range(args.processes):
            for fw in frameworks:
                runs[fw].append(run_child(["--child", fw, *common]))
    report(runs, names, args.processes, load_before)
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
