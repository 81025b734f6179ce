"""Speed of the attention implementations behind ``dot_product_attention``, per shape.

    python bench/attention.py [--shapes 2x1024x1024x8x8,...] [--processes 3]

A shape is ``BxLqxLkxHxD``; the defaults are the medium U-Net's attention calls
(bench/unet_step.py) and SD 1.5's first level at 512x512 (4096 tokens, head dim 40).
``fwd+bwd`` is the gradient of ``sum(out * w)`` with respect to q, k and v. Each
process reports the median of ``--repeats`` calls; the table shows the median over
``--processes`` fresh processes, float32, on the default JAX backend.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ensure_hugepages, median_ms, median_of, run_child  # noqa: E402

SHAPES = "2x1024x1024x8x8,2x1024x77x8x8,2x256x256x8x16,2x256x77x8x16,2x64x64x8x32,2x64x77x8x32,1x4096x4096x8x40"
IMPLEMENTATIONS = ("einsum", "recompute")


def time_shape(shape: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from e4t_jax.models import attention

    b, lq, lk, h, d = map(int, shape.split("x"))
    rng = np.random.default_rng(0)
    q, w = (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32) for _ in range(2))
    functions = {"einsum": attention.einsum_attention,
                 "recompute": lambda q, k, v: attention.recompute_attention(q, k, v, d ** -0.5, True)}
    results = {}
    for name, fn in functions.items():
        forward = jax.jit(fn)
        grads = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
        results[f"{shape}/{name}/fwd"] = median_ms(lambda: forward(q, k, v).block_until_ready(), repeats=repeats)
        results[f"{shape}/{name}/fwd+bwd"] = median_ms(lambda: jax.block_until_ready(grads(q, k, v)),
                                                       repeats=repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated BxLqxLkxHxD")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        results = {}
        for shape in shapes:
            results.update(time_shape(shape, args.repeats))
        print(json.dumps(results))
        return

    ensure_hugepages()
    runs = [run_child(["--child", "--shapes", args.shapes, "--repeats", str(args.repeats)])
            for _ in range(args.processes)]
    medians = median_of(runs)
    print(f"median of {args.processes} processes, ms\n")
    print("| B x Lq x Lk x H x D | pass | einsum | recompute | einsum/recompute |\n|---|---|---|---|---|")
    for shape in shapes:
        for step in ("fwd", "fwd+bwd"):
            einsum, recompute = (medians[f"{shape}/{name}/{step}"] for name in IMPLEMENTATIONS)
            print(f"| {shape} | {step} | {einsum:.2f} | {recompute:.2f} | {einsum / recompute:.2f} |")


if __name__ == "__main__":
    main()
