"""Speed of one U-Net step: our Flax U-Net (jit) against diffusers' PyTorch U-Net (eager).

    python bench/unet_step.py [--configs tiny,medium] [--processes 3] [--only jax]

Both load the same random weights (a diffusers model saved to a temporary folder) and
run on the same inputs. ``fwd`` is a forward pass; ``fwd+bwd`` is the loss
``mean(output ** 2)`` and its gradient with respect to every U-Net parameter. Each
framework runs in ``--processes`` fresh processes (alternating), each reporting the
median of ``--repeats`` timed calls after warm-up; the table shows the median over
processes. ``jax/torch`` below 1 means ours is faster. The FLOP count is XLA's cost
analysis of our lowered program with loop-free attention (:func:`model_flops`); GFLOP/s
divides it by our median time, against the float32 peak :data:`PEAK_GFLOPS` of the
2-core CPU the results were measured on. XLA flags come from the ``XLA_FLAGS``
environment variable, as usual.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cores, einsum_attention_only, ensure_hugepages, median_ms, median_of, run_child  # noqa: E402

CONFIGS = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, sample_size=16),
        batch=2, latent=16, tokens=77),
    "medium": dict(
        unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=64,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=8, sample_size=32),
        batch=2, latent=32, tokens=77),
}
PASSES = ("fwd", "fwd+bwd")
# float32 peak of the 2-core CPU measured here (AMD EPYC, AVX-512 on two 256-bit FMA pipes):
# 2 cores x ~2.6 GHz x 32 FLOP per cycle.
PEAK_GFLOPS = 166.0


def make_models(folder: Path, names: list[str]) -> None:
    """Saves a seeded diffusers U-Net and its inputs (NCHW sample, timesteps, context) per config."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    for name in names:
        spec = CONFIGS[name]
        torch.manual_seed(0)
        UNet2DConditionModel(**spec["unet"]).save_pretrained(folder / name)
        rng = np.random.default_rng(0)
        b, size = spec["batch"], spec["latent"]
        np.savez(folder / f"{name}_inputs.npz",
                 sample=rng.standard_normal((b, 4, size, size)).astype(np.float32),
                 timesteps=rng.integers(0, 1000, (b,)).astype(np.int64),
                 context=rng.standard_normal((b, spec["tokens"], spec["unet"]["cross_attention_dim"])).astype(np.float32))


def time_jax(folder: Path, name: str, repeats: int) -> dict:
    """Times our U-Net; saves its forward output (NCHW) for the parity check."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from e4t_jax.models.unet import load_unet

    model, params = load_unet(folder / name)
    params = jax.device_put(params)
    inputs = np.load(folder / f"{name}_inputs.npz")
    args = (jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["timesteps"]),
            jnp.asarray(inputs["context"]))

    def apply(p, *a):
        return model.apply({"params": p}, *a)

    programs = {"fwd": apply, "fwd+bwd": jax.value_and_grad(lambda p, *a: jnp.mean(apply(p, *a) ** 2))}
    forward, loss_and_grad = jax.jit(programs["fwd"]), jax.jit(programs["fwd+bwd"])
    np.save(folder / f"{name}_jax.npy", np.asarray(forward(params, *args)).transpose(0, 3, 1, 2))
    flops = model_flops(programs, params, args)
    return {f"{name}/fwd": median_ms(lambda: forward(params, *args).block_until_ready(), repeats=repeats),
            f"{name}/fwd+bwd": median_ms(lambda: jax.block_until_ready(loss_and_grad(params, *args)), repeats=repeats),
            **{f"{name}/{step}/gflop": value / 1e9 for step, value in flops.items()}}


def model_flops(programs: dict, params, args) -> dict[str, float]:
    """XLA's FLOP count of each ``{pass: function}``, traced with plain einsum attention.

    The cost analysis counts a loop's body once, so it is taken with the loop-free
    attention (the model's FLOPs; the recompute kernel's extra work is not counted).
    """
    import jax

    with einsum_attention_only():
        return {step: jax.jit(fn).lower(params, *args).cost_analysis()["flops"] for step, fn in programs.items()}


def time_torch(folder: Path, name: str, repeats: int) -> dict:
    """Times diffusers' U-Net in eager mode; saves its forward output."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(cores())
    model = UNet2DConditionModel.from_pretrained(folder / name)
    inputs = {k: torch.from_numpy(v) for k, v in np.load(folder / f"{name}_inputs.npz").items()}
    args = (inputs["sample"], inputs["timesteps"], inputs["context"])

    def forward():
        with torch.no_grad():
            return model(*args).sample

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss = model(*args).sample.square().mean()
        loss.backward()

    np.save(folder / f"{name}_torch.npy", forward().numpy())
    return {f"{name}/fwd": median_ms(forward, repeats=repeats),
            f"{name}/fwd+bwd": median_ms(forward_backward, repeats=repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,medium", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per framework")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--only", choices=("jax", "torch"), help="time one framework only")
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.configs.split(",")
    if args.child:
        timer = time_jax if args.child == "jax" else time_torch
        results = {}
        for name in names:
            results.update(timer(Path(args.folder), name, args.repeats))
        print(json.dumps(results))
        return

    ensure_hugepages()
    frameworks = [args.only] if args.only else ["jax", "torch"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_models(folder, names)
        runs = {fw: [] for fw in frameworks}
        for _ in range(args.processes):
            for fw in frameworks:
                runs[fw].append(run_child(["--child", fw, "--folder", tmp, "--configs", args.configs,
                                           "--repeats", str(args.repeats)]))
        print(f"cores {cores()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
              f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')!r}, median of {args.processes} processes, "
              f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (idle: 0)")
        for fw in frameworks:
            for key in runs[fw][0]:
                print(f"  {fw} {key} per process: " + ", ".join(f"{run[key]:.0f}" for run in runs[fw]))
        if len(frameworks) == 2:
            import numpy as np

            for name in names:
                diff = np.abs(np.load(folder / f"{name}_jax.npy") - np.load(folder / f"{name}_torch.npy")).max()
                print(f"  {name}: max |jax - torch| of the forward output {diff:.2e}")
        medians = {fw: median_of(runs[fw]) for fw in frameworks}
        print(f"\n| config | pass | jax ms | torch ms | jax/torch | jax GFLOP (XLA cost analysis) | jax GFLOP/s "
              f"| of {PEAK_GFLOPS:.0f} GFLOP/s peak |\n|---|---|---|---|---|---|---|---|")
        for name in names:
            for step in PASSES:
                key = f"{name}/{step}"
                jax_ms = medians.get("jax", {}).get(key, float("nan"))
                torch_ms = medians.get("torch", {}).get(key, float("nan"))
                gflop = medians.get("jax", {}).get(f"{key}/gflop", float("nan"))
                rate = gflop / (jax_ms / 1e3)
                print(f"| {name} | {step} | {jax_ms:.0f} | {torch_ms:.0f} | {jax_ms / torch_ms:.2f} | {gflop:.1f} "
                      f"| {rate:.1f} | {rate / PEAK_GFLOPS:.0%} |")


if __name__ == "__main__":
    main()
