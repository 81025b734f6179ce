"""The mini-domain experiment: does E4T personalize from one image, and how does it compare?

For held-out digits that nothing trained on (5 per class by default), each method gets
ONE render of the digit and must then draw that digit in new colours and positions:

* ``domain word``: the prompt says "digit" instead of ``S*`` (no personalization);
* ``TI-15/100/500``: Textual Inversion, snapshots of one 500-step run;
* ``E4T-5/15``: the pre-trained domain encoder, tuned 5 and 15 steps.

Every image is read back from its pixels (:mod:`e4t_jax.eval.digits`):

* identity: the digit classifier (trained on the training split) agrees with the
  input's true label (chance 0.1);
* instance top-5: the input digit is among the 5 held-out digits (of 297) whose glyph
  is most similar to the generated one (chance 0.017): same instance, not just class;
* prompt fidelity: the asked digit colour, background colour and position appear.

Wall time per concept is measured on one concept at a time, with compilation (the
first concept) and without (the median of the others). TI's quality numbers come
from runs that learn ``--ti-group`` concepts side by side in one batched step (each
embedding gets exactly its own gradient); its time is measured alone.

    python bench/minidomain.py --model runs/digits/model --encoder runs/digits-e4t/encoder

writes ``bench/results/minidomain.json``, ``bench/results/minidomain.md`` and the figure
``bench/results/minidomain.png`` (a row per concept: input, domain word, TI-15, TI-500,
E4T-5, E4T-15).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import method_figure  # noqa: E402

PROMPTS = (  # (digit colour, background, position) asked for; None = not asked
    ("green", None, None),
    ("yellow", "blue", "left"),
    ("white", "red", "right"),
    ("black", "white", "center"),
)
TEMPLATES = ("a {}", "a picture of a {}", "a drawing of a {}")  # personalization prompts: the image only


def choose_concepts(per_class: int) -> np.ndarray:
    """The first ``per_class`` held-out digits of each class, in class order."""
    from e4t_jax import digits

    _, labels = digits.load_glyphs()
    held_out = digits.split_indices("held_out")
    return np.concatenate([held_out[labels[held_out] == c][:per_class] for c in range(10)])


def input_render(index: int) -> tuple[np.ndarray, object]:
    """The one image a method gets: the digit with attributes seeded by its index."""
    from e4t_jax import digits

    glyphs, _ = digits.load_glyphs()
    attributes = digits.random_attributes(np.random.default_rng(10_000 + int(index)))
    return digits.render(glyphs[index], attributes), attributes


def score(images: np.ndarray, label: int, reference: int, asked: list[tuple], reader, candidates) -> dict:
    """Per-image metrics of one (concept, method) cell, averaged.

    Args:
      images: ``uint8 [N, 16, 16, 3]``, prompt-major (``asked[i % len(asked)]``).
      label: the input digit's class; reference: its row in ``candidates``.
    """
    from e4t_jax.eval import digits as reading

    readings = [reading.read(image) for image in images]
    predicted = reader.classify(readings)
    ranks = np.asarray([reading.instance_rank(r.glyph, reference, candidates) for r in readings])
    hits = {"color": [], "background": [], "position": []}
    for i, r in enumerate(readings):
        color, background, position = asked[i % len(asked)]
        for name, want, got in (("color", color, r.color), ("background", background, r.background),
                                ("position", position, r.position)):
            if want is not None:
                hits[name].append(want == got)
    return {"identity": float(np.mean(predicted == label)), "instance_top5": float(np.mean(ranks < 5)),
            **{name: float(np.mean(v)) for name, v in hits.items()}}


def markdown_table(summary: dict) -> str:
    """The results table (one row per method)."""
    head = ("| method | steps | identity | instance top-5 | colour | background | position | "
            "s/concept (compile incl.) | s/concept (warm) | artifact |")
    lines = [head, "|" + "---|" * 10]
    for name, row in summary.items():
        lines.append(f"| {name} | {row['steps']} | {row['identity']:.2f} | {row['instance_top5']:.2f} | "
                     f"{row['color']:.2f} | {row['background']:.2f} | {row['position']:.2f} | "
                     f"{row['seconds_first']:.1f} | {row['seconds_warm']:.2f} | {row['artifact']} |")
    return "\n".join(lines)


def textual_inversion(sd, params, token_id: int, word_id: int, ids: np.ndarray, images: list[np.ndarray], *,
                      steps: int, snapshots: tuple[int, ...], batch_size: int, lr: float,
                      seed: int) -> tuple[dict, float, float]:
    """Learns one embedding per image, all side by side; returns ``({step: [C, D]}, compile s, run s)``.

    ``ids``: ``[>= batch_size, 77]`` prompt ids (templates with the placeholder); each
    image is repeated ``batch_size`` times per step with its own noise.
    """
    import functools

    import jax
    import optax

    from e4t_jax.baselines import textual_inversion as ti
    from e4t_jax.training import steps as steps_lib

    count = len(images)
    optimizer = optax.adam(lr)
    state = steps_lib.TrainState.create(ti.init_params(params["text"], word_id, concepts=count), optimizer,
                                        jax.random.key(seed))
    loss = functools.partial(ti.loss, sd=sd, token_id=token_id)
    step = jax.jit(functools.partial(steps_lib.train_step, loss_fn=loss, optimizer=optimizer))
    pixels = np.concatenate([np.repeat((img[None].astype(np.float32) / 127.5 - 1), batch_size, 0) for img in images])
    batch = {"pixels": pixels, "input_ids": np.tile(ids[:batch_size], (count, 1)),
             "index": np.arange(count * batch_size, dtype=np.int32),
             "concept": np.repeat(np.arange(count, dtype=np.int32), batch_size)}
    batch = jax.device_put(batch)  # one copy to the device, not one per step
    start = time.perf_counter()
    step = step.lower(state, params, batch).compile()
    compile_s, start = time.perf_counter() - start, time.perf_counter()
    saved = {}
    for i in range(1, steps + 1):
        state, _ = step(state, params, batch)
        if i in snapshots:
            saved[i] = np.asarray(state.params["embedding"])
    jax.block_until_ready(state)
    return saved, compile_s, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="digits", help="the digits base model (preset or folder)")
    parser.add_argument("--encoder", default=None, help="its domain encoder (default: the preset's)")
    parser.add_argument("--per-class", type=int, default=5, help="held-out concepts per digit class")
    parser.add_argument("--samples", type=int, default=2, help="pictures per prompt (different noise)")
    parser.add_argument("--ti-steps", type=int, default=500)
    parser.add_argument("--ti-batch-size", type=int, default=2)
    parser.add_argument("--ti-lr", type=float, default=5e-3)
    parser.add_argument("--ti-group", type=int, default=10, help="concepts learned side by side in one TI run")
    parser.add_argument("--e4t-lr", type=float, default=None, help="default: the encoder's recorded value")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from e4t_jax import digits, pipeline, runtime
    from e4t_jax.e4t.pretrained import default_encoder, load_pretrained
    from e4t_jax.eval import digits as reading
    from e4t_jax.recipes.personalize import default_train, personalize, save, tuned_concept

    runtime.enable_compilation_cache(None)
    args.out.mkdir(parents=True, exist_ok=True)
    reader = reading.DigitReader()
    classifier_accuracy = reader.held_out_accuracy()
    glyphs, labels = digits.load_glyphs()
    held_out = digits.split_indices("held_out")
    candidates = np.stack([reading.reference_glyph(glyphs[i]) for i in held_out])
    concepts = choose_concepts(args.per_class)
    inputs = [input_render(i)[0] for i in concepts]
    print(f"classifier held-out accuracy {classifier_accuracy:.3f}; {len(concepts)} concepts", flush=True)

    e = load_pretrained(args.model, args.encoder or default_encoder(args.model))
    sd, base, tok = e.model.sd, e.frozen.base, e.tokenizer
    placeholder, token_id = e.config.model.placeholder, e.model.placeholder_id
    word_id = tok.token_ids(e.config.model.domain_word)[0]
    asked = [p for p in PROMPTS for _ in range(args.samples)]
    prompts = {w: tok.encode([digits.attribute_prompt(w, *a) for a in asked]) for w in ("digit", placeholder)}
    uncond = tok.encode([""] * len(asked))
    ti_ids = tok.encode([t.format(placeholder) for t in TEMPLATES] * args.ti_batch_size)
    generator = pipeline.Generator(sd)

    def sample(word, hooks=pipeline.Hooks()):
        images = generator(base, prompts[word], uncond, seed=0, num_steps=args.sample_steps, guidance=args.guidance,
                           hooks=hooks)
        return pipeline.to_uint8(images)

    cells: dict[str, list[np.ndarray]] = {}
    timing: dict[str, tuple[float, float]] = {}
    sizes: dict[str, str] = {}

    # Domain word: nothing personalized.
    cells["domain word"] = [sample("digit")] * len(concepts)
    timing["domain word"], sizes["domain word"] = (0.0, 0.0), "0"

    # Textual Inversion: timed alone on one concept, then learned in groups for the scores.
    snapshots = tuple(sorted({s for s in (15, 100, args.ti_steps) if s <= args.ti_steps}))
    _, compile_s, run_s = textual_inversion(sd, base, token_id, word_id, ti_ids, inputs[:1], steps=args.ti_steps,
                                            snapshots=(), batch_size=args.ti_batch_size, lr=args.ti_lr, seed=0)
    print(f"TI alone: compile {compile_s:.1f}s, {args.ti_steps} steps {run_s:.1f}s", flush=True)
    learned = {s: [] for s in snapshots}
    for g in range(0, len(concepts), args.ti_group):
        group = inputs[g:g + args.ti_group]
        saved, _, seconds = textual_inversion(sd, base, token_id, word_id, ti_ids, group, steps=args.ti_steps,
                                              snapshots=snapshots, batch_size=args.ti_batch_size, lr=args.ti_lr,
                                              seed=g)
        for s in snapshots:
            learned[s].extend(saved[s])
        print(f"TI group {g // args.ti_group + 1}: {seconds:.0f}s", flush=True)
    for s in snapshots:
        name = f"TI-{s}"
        per_step = run_s / args.ti_steps
        timing[name] = (compile_s + per_step * s, per_step * s)
        sizes[name] = f"{sd.text_dim * 4} B"
        cells[name] = [sample(placeholder, pipeline.Hooks(overrides=(pipeline.TokenOverride(
            jnp.int32(token_id), jnp.asarray(v, jnp.float32)),))) for v in learned[s]]
        print(f"{name} sampled", flush=True)

    # E4T: the pre-trained encoder, tuned on each image.
    for tune_steps in (5, 15):
        name, seconds, images = f"E4T-{tune_steps}", [], []
        for k, image in enumerate(inputs):
            train = default_train(e, steps_count=tune_steps, lr=args.e4t_lr, seed=k)
            result = personalize(e, image, train, progress=False)
            seconds.append((result.timings["compile"] + result.timings["tune"], result.timings["tune"]))
            images.append(sample(placeholder, tuned_concept(e, result).hooks()))
            if k == 0:
                path = save(args.out / "minidomain-concept.safetensors", e, result)
                sizes[name] = f"{path.stat().st_size / 1024:.0f} KiB"
                path.unlink()
        cells[name] = images
        timing[name] = (seconds[0][0], float(np.median([s[1] for s in seconds[1:]])))
        print(f"{name}: first {seconds[0][0]:.1f}s, warm median {timing[name][1]:.2f}s", flush=True)

    summary, per_concept = {}, {}
    for name, images in cells.items():
        rows = [score(imgs, int(labels[i]), int(np.nonzero(held_out == i)[0][0]), asked, reader, candidates)
                for imgs, i in zip(images, concepts)]
        per_concept[name] = rows
        steps = name.split("-")[1] if "-" in name else "0"
        summary[name] = {"steps": steps, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
                         "seconds_first": timing[name][0], "seconds_warm": timing[name][1], "artifact": sizes[name]}
    table = markdown_table(summary)
    print(table)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "minidomain.json").write_text(json.dumps(
        {"config": config, "classifier_held_out_accuracy": classifier_accuracy, "concepts": concepts.tolist(),
         "prompts": [list(p) for p in PROMPTS], "summary": summary, "per_concept": per_concept}, indent=1))
    (args.out / "minidomain.md").write_text(table + "\n")
    shown = [list(concepts).index(i) for i in concepts[::args.per_class]]  # one concept per class
    columns = ["input", "domain word", "TI-15", f"TI-{args.ti_steps}", "E4T-5", "E4T-15"]
    shown_prompt = args.samples * 1  # the first picture of PROMPTS[1] (all three attributes asked)
    method_figure([[inputs[k]] + [cells[c][k][shown_prompt] for c in columns[1:]] for k in shown], columns,
                  args.out / "minidomain.png", cell=6 * digits.CANVAS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
