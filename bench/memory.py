"""Compiled memory of E4T's steps, up to the paper's full size, without any weights.

Every program is compiled for shapes only: the params come from ``jax.eval_shape``
(nothing is materialized), then ``.lower(...).compile().memory_analysis()`` gives
XLA's bytes of the arguments, outputs and temporaries, and those outputs share with
donated arguments (aliased); the peak is arguments + outputs + temporaries - aliased.
So the full-size rows run on a laptop CPU.

    python bench/memory.py --model full            # SD 1.5 + OpenCLIP ViT-H/14 (the paper's model)
    python bench/memory.py --model medium --rows stages

``--model``: ``full`` (:func:`e4t_jax.presets.full_size_configs`), a random preset
(``tiny``, ``medium``) or a diffusers folder (its ``config.json`` files only). The
train step is the whole E4T update (VAE encode, vision tower, U-Net features, head,
text encoder with ``v*``, U-Net, loss, backward, AdamW on head + offsets; the frozen
model donated nothing). ``--rows``:

* ``full``: the personalization step at an effective batch of 16 (float32 or bfloat16
  frozen storage, U-Net block remat on or off, 1, 4 or 16 micro-batches accumulated in
  the step, attention by ``recompute`` or plain ``einsum``); the pre-training step at a
  per-device batch of 1, 4, 8 and 10 to 64 (what fits in 15 and 80 GiB);
* ``stages``: pre-training (``--batch-size``), personalization (batch 16) and generation
  (1 image, 25 steps) in float32 and bfloat16.

XLA:CPU's buffer assignment only approximates a GPU's or TPU's (on CPU, bfloat16 dots
and convolutions also run through float32 copies, which inflates temporaries), so read
the temporaries as an estimate; arguments are exact. The train steps are compiled with
XLA:CPU's memory-optimized scheduler (:data:`MEMORY_SCHEDULER`), as accelerators
schedule. Rows are appended to ``--json``
as they finish and a re-run skips the rows already there (a full-size compile takes
minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import einsum_attention_only  # noqa: E402

GIB = 2**30
# XLA:CPU's default scheduler favours concurrency and mostly cancels what remat saves;
# GPU and TPU schedule for memory, so the train steps are compiled with this one.
MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled program: a train step (``batch`` > 0) or generation (``batch`` 0)."""

    stage: str
    batch: int
    dtype: str = "bfloat16"
    remat: bool = True
    micro_batches: int = 1
    attention: str = "recompute"

    @property
    def key(self) -> str:
        return (f"{self.stage}|{self.batch}|{self.dtype}|{'remat' if self.remat else 'no remat'}|"
                f"{self.micro_batches}|{self.attention}")


def full_rows() -> list[Row]:
    """The variants of the full-size table."""
    tune = functools.partial(Row, "personalization", 16)
    pre = functools.partial(Row, "pre-training")
    return [tune("bfloat16", True, 16), tune("float32", False, 1), tune("bfloat16", False, 1),
            tune("bfloat16", True, 1), tune("bfloat16", True, 4), tune("float32", True, 16),
            tune("bfloat16", False, 16), tune("bfloat16", True, 16, "einsum"),
            pre(1, "float32", False), pre(1), pre(4), pre(8), pre(10), pre(16), pre(32), pre(64)]


def stage_rows(batch: int) -> list[Row]:
    return [Row(stage, size, dtype, remat=False)
            for stage, size in (("pre-training", batch), ("personalization", 16), ("generation", 0))
            for dtype in ("float32", "bfloat16")]


def model_configs(model: str) -> dict[str, dict]:
    """``{component: config.json}`` of ``full``, a random preset or a diffusers folder."""
    from e4t_jax import presets, weights

    if model == "full":
        return presets.full_size_configs()
    if model in presets.PRESETS:
        return presets.preset_configs(model)
    folder = Path(model)
    names = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "image_encoder": "config.json", "scheduler": "scheduler_config.json"}
    return {part: weights.read_config(folder / part, name) for part, name in names.items()}


def abstract_e4t(configs: dict[str, dict], dtype, remat: bool):
    """``(model, frozen, params, tokenizer)`` of E4T with ``jax.ShapeDtypeStruct`` leaves only."""
    import jax
    import jax.numpy as jnp

    from e4t_jax import conditioning, pipeline, schedulers
    from e4t_jax.e4t import model as model_lib
    from e4t_jax.e4t import vision as vision_lib
    from e4t_jax.e4t.config import E4TConfig, EncoderConfig, ModelConfig
    from e4t_jax.e4t.encoder import EncoderHead
    from e4t_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer
    from e4t_jax.models.unet import UNet2DConditionModel, UNetConfig
    from e4t_jax.models.vae import AutoencoderKL, VAEConfig
    from e4t_jax.tokenizer import Tokenizer, make_tiny_tokenizer_files

    unet = UNet2DConditionModel(UNetConfig.from_diffusers(configs["unet"]), dtype=dtype, remat=remat)
    vae = AutoencoderKL(VAEConfig.from_diffusers(configs["vae"]), dtype=dtype)
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(configs["text_encoder"]), dtype=dtype)
    vision = CLIPVisionTransformer(CLIPVisionConfig.from_dict(configs["image_encoder"]), dtype=dtype)
    scheduler = schedulers.SchedulerConfig.from_diffusers(configs["scheduler"])
    sd = pipeline.StableDiffusion(unet, vae, conditioning.CLIPText(text), scheduler, Path("."), "shapes only")

    def init(module, *shapes):
        abstract = jax.eval_shape(module.init, jax.random.key(0), *shapes)["params"]
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype if s.dtype == jnp.float32 else s.dtype),
                            abstract)

    f32 = jnp.float32
    latent = jax.ShapeDtypeStruct((1, unet.config.sample_size, unet.config.sample_size, 4), f32)
    context = jax.ShapeDtypeStruct((1, 77, unet.config.cross_attention_dim), f32)
    size = vision.config.image_size
    base = {"unet": init(unet, latent, jax.ShapeDtypeStruct((1,), f32), context),
            "vae": init(vae, jax.ShapeDtypeStruct((1, 64, 64, 3), f32)),
            "text": init(text, jax.ShapeDtypeStruct((1, 77), jnp.int32))}
    vision_params = init(vision, jax.ShapeDtypeStruct((1, size, size, 3), f32))
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_files(Path(tempfile.mkdtemp()) / "tokenizer"))
    token_id, word_id = tokenizer.add_placeholder("S*", "face")
    config = E4TConfig(model=ModelConfig(base="shapes only"), encoder=EncoderConfig(text_dim=sd.text_dim))
    model = model_lib.E4TModel(sd, EncoderHead(config.encoder), config, token_id, vision_lib.CLIPBackbone(vision))
    frozen = jax.eval_shape(lambda b, v: model_lib.frozen_params(model, b, v, tokenizer, word_id), base, vision_params)
    params = jax.eval_shape(lambda fr: model_lib.init_params(model, fr), frozen)
    return model, frozen, params, tokenizer


def compile_row(configs: dict[str, dict], row: Row, steps: int = 25):
    """The compiled program of ``row``."""
    with einsum_attention_only() if row.attention == "einsum" else contextlib.nullcontext():
        return _compile_row(configs, row, steps)


def _compile_row(configs: dict[str, dict], row: Row, steps: int):
    import jax
    import jax.numpy as jnp

    from e4t_jax import pipeline
    from e4t_jax.e4t import model as model_lib
    from e4t_jax.training import steps as steps_lib
    from e4t_jax.training.config import OptimizerConfig

    model, frozen, params, tokenizer = abstract_e4t(configs, jnp.dtype(row.dtype), row.remat)
    if row.stage == "generation":
        return pipeline.Generator(model.sd).compile(frozen.base, tokenizer.encode(["a photo of a face"]),
                                                    tokenizer.encode([""]), num_steps=steps)
    optimizer = steps_lib.make_optimizer(OptimizerConfig())
    step = jax.jit(functools.partial(steps_lib.train_step, optimizer=optimizer, grad_accum=row.micro_batches,
                                     loss_fn=functools.partial(model_lib.loss, model=model)), donate_argnums=(0,))
    state = jax.eval_shape(lambda p: steps_lib.TrainState.create(p, optimizer, jax.random.key(0)), params)
    size = model.sd.image_size
    batch = {"pixels": jax.ShapeDtypeStruct((row.batch, size, size, 3), jnp.float32),
             "input_ids": jax.ShapeDtypeStruct((row.batch, tokenizer.model_max_length), jnp.int32),
             "index": jax.ShapeDtypeStruct((row.batch,), jnp.int32)}
    return step.lower(state, frozen, batch).compile(MEMORY_SCHEDULER)


def frozen_bytes(configs: dict[str, dict], dtype: str) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    _, frozen, _, _ = abstract_e4t(configs, jnp.dtype(dtype), False)
    return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(frozen)))


def measure(configs: dict[str, dict], row: Row) -> dict:
    start = time.perf_counter()
    memory = compile_row(configs, row).memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return {**dataclasses.asdict(row), **sizes, "compile_s": round(time.perf_counter() - start, 1)}


def table(results: list[dict], unit: int, unit_name: str) -> str:
    lines = [f"| stage | batch (micro-batches) | dtype | remat | attention | arguments | outputs | temporaries "
             f"| aliased | peak ({unit_name}) | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        batch = "1 image" if r["stage"] == "generation" else f"{r['batch']} ({r['micro_batches']})"
        sizes = " | ".join(f"{r[k] / unit:.2f}" for k in ("arguments", "outputs", "temporaries", "aliased", "peak"))
        lines.append(f"| {r['stage']} | {batch} | {r['dtype']} | {'on' if r['remat'] else 'off'} | {r['attention']} "
                     f"| {sizes} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="full", help="full, a random preset, or a diffusers folder")
    parser.add_argument("--rows", choices=["full", "stages"], default="full", help="which variants to compile")
    parser.add_argument("--batch-size", type=int, default=4, help="pre-training batch of --rows stages")
    parser.add_argument("--json", type=Path, default=None, help="append each row here; rows already there are kept")
    args = parser.parse_args(argv)

    configs = model_configs(args.model)
    rows = full_rows() if args.rows == "full" else stage_rows(args.batch_size)
    done = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    if done and done.get("model") != args.model:
        parser.error(f"{args.json} holds rows of --model {done.get('model')}; choose another --json")
    results = done.get("rows", {})
    for row in rows:
        if row.key not in results:
            results[row.key] = measure(configs, row)
            print(f"{row.key}: peak {results[row.key]['peak'] / GIB:.2f} GiB, "
                  f"compile {results[row.key]['compile_s']:.0f} s", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"model": args.model, "rows": results}, indent=1) + "\n")
    unit, name = (GIB, "GiB") if args.model == "full" else (2**20, "MiB")
    print(f"\nmodel {args.model}; frozen weights {frozen_bytes(configs, 'float32') / unit:.2f} {name} in float32, "
          f"{frozen_bytes(configs, 'bfloat16') / unit:.2f} {name} in bfloat16; sizes in {name}\n")
    print(table([results[row.key] for row in rows], unit, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
