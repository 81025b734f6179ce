"""Compiled memory of E4T's three stages, frozen weights stored in float32 or bfloat16.

For each storage dtype (``--dtype``, which is also the compute dtype) the programs are
compiled, not run, and XLA's memory analysis of each is printed: arguments, outputs,
temporaries, the bytes that outputs share with donated arguments, and their peak
(arguments + outputs + temporaries - aliased), beside the frozen weights' own bytes.

* pre-training step: one E4T train step (encoder head + offsets, AdamW) at ``--batch-size``;
* personalization step: the same step at the personalization batch (16 by default);
* generation: the whole sampling program (text encoder, ``--steps`` denoising steps with
  classifier-free guidance, VAE decode) for one image.

    python bench/memory.py --model medium

XLA:CPU's buffer assignment only approximates a GPU's or TPU's (and on CPU, bf16
convolutions and dots run through float32 copies), so read the temporaries as an
estimate; the arguments are exact.
"""
from __future__ import annotations

import argparse
import functools


def analysis(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled program, in bytes."""
    memory = compiled.memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return sizes


def stage_memory(model: str, dtype: str, pretrain_batch: int, tune_batch: int, steps: int) -> dict[str, dict]:
    """``{stage: analysis}`` of the three programs, and the frozen weights' bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from e4t_jax import pipeline
    from e4t_jax.e4t import model as model_lib
    from e4t_jax.e4t.config import E4TConfig, ModelConfig
    from e4t_jax.training import steps as steps_lib
    from e4t_jax.training.config import OptimizerConfig

    e = model_lib.build(E4TConfig(model=ModelConfig(base=model, domain_word="face")), dtype=jnp.dtype(dtype))
    optimizer = steps_lib.make_optimizer(OptimizerConfig())
    step = jax.jit(functools.partial(steps_lib.train_step, optimizer=optimizer,
                                     loss_fn=functools.partial(model_lib.loss, model=e.model)), donate_argnums=(0,))
    state = jax.eval_shape(lambda: steps_lib.TrainState.create(e.params, optimizer, jax.random.key(0)))
    size = e.sd.image_size

    def batch(n: int) -> dict:
        return {"pixels": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32),
                "input_ids": jax.ShapeDtypeStruct((n, e.tokenizer.model_max_length), jnp.int32),
                "index": jax.ShapeDtypeStruct((n,), jnp.int32)}

    ids = e.tokenizer.encode(["a photo of a face"])
    generator = pipeline.Generator(e.sd)
    return {
        f"pre-training step (batch {pretrain_batch})": analysis(step.lower(state, e.frozen, batch(pretrain_batch))
                                                                .compile()),
        f"personalization step (batch {tune_batch})": analysis(step.lower(state, e.frozen, batch(tune_batch))
                                                               .compile()),
        f"generation (1 image, {steps} steps)": analysis(generator.compile(e.frozen.base, ids,
                                                                           e.tokenizer.encode([""]), num_steps=steps)),
        "frozen weights": {"bytes": int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(e.frozen)))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="medium", help="a preset or diffusers folder with image_encoder/")
    parser.add_argument("--batch-size", type=int, default=4, help="pre-training batch")
    parser.add_argument("--tune-batch-size", type=int, default=16, help="personalization batch")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the generation program")
    args = parser.parse_args(argv)

    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    rows = {dtype: stage_memory(args.model, dtype, args.batch_size, args.tune_batch_size, args.steps)
            for dtype in ("float32", "bfloat16")}
    print(f"model {args.model}; MiB; bfloat16/float32 ratio of the peak in the last column\n")
    print("| stage | dtype | arguments | outputs | temporaries | aliased | peak | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in rows["float32"]:
        for dtype, stages in rows.items():
            sizes = stages[stage]
            if "bytes" in sizes:
                ratio = sizes["bytes"] / rows["float32"][stage]["bytes"]
                print(f"| {stage} | {dtype} | {mib(sizes['bytes'])} | | | | | {ratio:.2f} |")
                continue
            ratio = sizes["peak"] / rows["float32"][stage]["peak"]
            print(f"| {stage} | {dtype} | " + " | ".join(mib(sizes[k]) for k in
                  ("arguments", "outputs", "temporaries", "aliased", "peak")) + f" | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
