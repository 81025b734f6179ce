"""The paper's comparison on your own concepts: E4T against Textual Inversion and DreamBooth.

Each concept is a folder of 1-N images (the first, by name, is the one image that the
one-image methods see). Every method learns each concept with the project's own code,
then draws it with the same prompts, samples and seeds:

* ``domain word``: no learning; ``S*`` in the prompt becomes the class word;
* ``TI-1``, ``TI-5``: Textual Inversion (``e4t-ti``) from 1 and up to 5 images;
* ``DB-1``, ``DB-5``: DreamBooth (``e4t-dreambooth``, the U-Net fine-tuned, prior
  preservation when ``--class-images`` > 0), prompted with "S* CLASS" as it was trained;
* ``TI+DB-1``: DreamBooth that also learns the placeholder's embedding, from 1 image;
* ``E4T``: the pre-trained domain encoder tuned on the one image (``e4t-personalize``).

Scores (:mod:`e4t_jax.eval`), averaged over a method's pictures of every concept:
CLIP-I (picture vs the concept's first image) and CLIP-T (picture vs its prompt, the
placeholder replaced by the class word) with the CLIP checkpoint of ``--clip``; face
identity with dlib's descriptor when the ``[faces]`` extra is installed: the mean
distance to the input over pictures that show a face, how many of them are the same
person (< 0.6), and how many show a face at all ("no face" pictures get no number).
Also the learning time per concept with compilation apart, and the artifact size.

    python bench/compare_methods.py --model tiny --encoder ENCODER --concepts photos/ --clip clip-vit-base-patch32/ \\
        --out bench/results/compare

writes ``OUT/table.md``, ``OUT/results.json``, the figure ``OUT/figure.png`` (a row per
concept: the input, then each method's picture for the first prompt) and every
artifact and picture under ``OUT/concepts/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import method_figure  # noqa: E402
from e4t_jax import cli  # noqa: E402
from e4t_jax.errors import UserError  # noqa: E402

log = logging.getLogger("compare")
METHODS = ("domain word", "TI-1", "TI-5", "DB-1", "DB-5", "TI+DB-1", "E4T")
PROMPTS = ("a photo of S*", "a painting of S*", "S* on the beach")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="compare_methods.py", description=__doc__.split("\n\n")[0])
    cli.add_model(p, "the base model: folder, Hugging Face id or preset")
    p.add_argument("--encoder", default=None, help="E4T domain encoder (default: the preset's shipped one)")
    p.add_argument("--concepts", type=Path, required=True, help="a folder holding one folder of images per concept")
    p.add_argument("--class-word", default=None, help="the concepts' class word (default: the encoder's domain word)")
    p.add_argument("--prompt", action="append", default=None, help=f"prompt with S* (repeatable; default {PROMPTS})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    p.add_argument("--samples", type=cli.integer(1), default=2, help="pictures per prompt (different noise)")
    p.add_argument("--sample-steps", type=cli.integer(1), default=25, help="denoising steps of each picture")
    p.add_argument("--ti-steps", type=cli.integer(1), default=500, help="Textual Inversion steps")
    p.add_argument("--db-steps", type=cli.integer(1), default=400, help="DreamBooth steps")
    p.add_argument("--e4t-steps", type=cli.integer(1), default=15, help="E4T tuning steps")
    p.add_argument("--e4t-batch-size", type=cli.integer(1), default=None,
                   help="augmented copies per E4T step (default: the encoder's recorded value)")
    p.add_argument("--ti-batch-size", type=cli.integer(1), default=4, help="Textual Inversion batch")
    p.add_argument("--class-images", type=cli.integer(0), default=50,
                   help="DreamBooth prior-preservation images (0: none)")
    p.add_argument("--clip", type=Path, default=None, help="a transformers CLIPModel folder for CLIP-I/CLIP-T")
    p.add_argument("--seed", type=cli.integer(0), default=0, help="data, noise and sampling seed")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the report")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(args.methods) - set(METHODS)):
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty; choose a new folder")
    args.prompt = args.prompt or list(PROMPTS)
    return args


def concept_images(root: Path) -> dict[str, list[Path]]:
    """``{concept name: its image files, sorted}`` for each sub-folder of ``root`` that holds images."""
    from e4t_jax.training import data

    if not root.is_dir():
        raise UserError(f"--concepts {root} is not a folder")
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found[folder.name] = sorted(data.list_images(folder))
        except FileNotFoundError:
            log.warning("skipped %s: no images", folder)
    if not found:
        raise UserError(f"--concepts {root} holds no folder of images (one folder per concept)")
    return found


def subset(images: list[Path], count: int, folder: Path) -> Path:
    """A folder holding copies of the first ``count`` images (the data of a k-image method)."""
    folder.mkdir(parents=True)
    for path in images[:count]:
        shutil.copy2(path, folder / path.name)
    return folder


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def learn(method: str, args, images: list[Path], work: Path) -> dict:
    """Runs one method on one concept; returns how to draw with it and what it cost."""
    from e4t_jax.recipes import dreambooth, personalize, textual_inversion
    from e4t_jax.training.config import OptimizerConfig, TrainConfig

    if method == "domain word":
        return {"model": args.model, "concepts": [], "placeholder": args.class_word, "seconds": {}, "bytes": 0,
                "images": 0, "steps": 0}
    count = 1 if method.endswith("-1") or method == "E4T" else min(5, len(images))
    data = subset(images, count, work / "data")
    if method.startswith("TI-"):
        out = work / "concept.safetensors"
        train = TrainConfig(steps=args.ti_steps, batch_size=args.ti_batch_size, seed=args.seed,
                            optimizer=OptimizerConfig(lr=textual_inversion.DEFAULT_TRAIN.optimizer.lr))
        seconds = textual_inversion.learn_file(args.model, data, out, init_word=args.class_word, train=train)
        drawn = {"model": args.model, "concepts": [out], "placeholder": "S*", "bytes": size_of(out)}
    elif method.startswith("DB-") or method.startswith("TI+DB"):
        out = work / "model"
        config = dreambooth.DreamBoothConfig(class_word=args.class_word, steps=args.db_steps, seed=args.seed,
                                             prior_preservation=args.class_images > 0,
                                             num_class_images=max(args.class_images, 1),
                                             textual_inversion=method.startswith("TI+DB"))
        seconds = dreambooth.dreambooth_files(args.model, data, out, config)
        concepts = [out / dreambooth.CONCEPT_FILE] if config.textual_inversion else []
        drawn = {"model": out, "concepts": concepts, "placeholder": f"S* {args.class_word}", "bytes": size_of(out)}
    else:
        out = work / "concept.safetensors"
        seconds = personalize.personalize_file(args.model, args.encoder, images[0], out, steps_count=args.e4t_steps,
                                               batch_size=args.e4t_batch_size, seed=args.seed, preview_prompts=())
        seconds["train"] = seconds.pop("tune")
        drawn = {"model": args.model, "concepts": [out], "placeholder": "S*", "bytes": size_of(out)}
    steps = {"TI": args.ti_steps, "DB": args.db_steps, "TI+DB": args.db_steps, "E4T": args.e4t_steps}
    return {**drawn, "seconds": seconds, "images": count, "steps": steps[method.split("-")[0]]}


def draw(learned: dict, args, folder: Path) -> list[np.ndarray]:
    """The pictures of every prompt (``--samples`` each, prompt-major), uint8 ``[H, W, 3]``."""
    from PIL import Image

    from e4t_jax.recipes.generate import generate_files

    prompts = [p.replace("S*", learned["placeholder"]) for p in args.prompt]
    paths = generate_files(learned["model"], prompts, folder, concepts=learned["concepts"], num_images=args.samples,
                           seed=args.seed, num_steps=args.sample_steps)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def score(pictures: list[np.ndarray], reference: np.ndarray, args, scorer, faces) -> dict:
    """Per-picture scores: ``clip_i``, ``clip_t`` (None without ``--clip``) and ``identity`` (a distance,
    "no face", or None without the faces extra)."""
    prompts = [p for p in args.prompt for _ in range(args.samples)]
    scores = {"clip_i": None, "clip_t": None, "identity": None}
    if scorer is not None:
        scores["clip_i"] = [float(s) for s in scorer.clip_i(pictures, reference)]
        scores["clip_t"] = [float(s) for s in scorer.clip_t(pictures, prompts, class_word=args.class_word)]
    if faces is not None:
        scores["identity"] = [d if d is faces.NO_FACE else float(d)
                              for d in (faces.identity_distance(p, reference) for p in pictures)]
    return scores


def summarize(method: str, runs: list[dict], faces) -> dict:
    """One table row: means over the concepts' pictures and runs."""
    def mean(key):
        values = [v for run in runs for v in (run["scores"][key] or [])]
        return statistics.fmean(values) if values else None

    row = {"method": method, "images": max(r["images"] for r in runs), "steps": runs[0]["steps"],
           "compile_s": statistics.fmean(r["seconds"].get("compile", 0.0) for r in runs),
           "train_s": statistics.fmean(r["seconds"].get("train", 0.0) for r in runs),
           "bytes": statistics.fmean(r["bytes"] for r in runs), "clip_i": mean("clip_i"), "clip_t": mean("clip_t")}
    if faces is not None:
        distances = [d for r in runs for d in r["scores"]["identity"] if d is not faces.NO_FACE]
        total = sum(len(r["scores"]["identity"]) for r in runs)
        row["identity"] = statistics.fmean(distances) if distances else faces.NO_FACE_TEXT
        row["same_person"] = sum(faces.same_person(d) for d in distances)
        row["faces"] = f"{len(distances)}/{total}"
    return row


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def markdown_table(rows: list[dict]) -> str:
    def number(value):
        return "n/a" if value is None else value if isinstance(value, str) else f"{value:.3f}"

    faces = "identity" in rows[0]
    head = ["method", "images", "steps", "learning s (warm)", "compile s", "artifact", "CLIP-I", "CLIP-T"]
    head += ["identity (dlib distance)", "pictures with a face", "same person"] if faces else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["images"]), str(r["steps"]), f"{r['train_s']:.1f}", f"{r['compile_s']:.1f}",
                 _size(r["bytes"]) if r["bytes"] else "0", number(r["clip_i"]), number(r["clip_t"])]
        if faces:
            cells += [number(r["identity"]), r["faces"], str(r["same_person"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from e4t_jax import runtime
    from e4t_jax.e4t.pretrained import default_encoder, read_config
    from e4t_jax.eval import faces as faces_lib
    from e4t_jax.eval.clip_score import ClipScorer
    from e4t_jax.training import data

    concepts = concept_images(args.concepts)
    args.encoder = args.encoder or default_encoder(args.model)
    if "E4T" in args.methods and args.encoder is None:
        raise UserError(f"--model {args.model} has no shipped encoder: pass --encoder (or leave E4T out of --methods)")
    if args.class_word is None:
        if args.encoder is None:
            raise UserError("pass --class-word (there is no encoder to take its domain word from)")
        args.class_word = read_config(args.encoder)[0].model.domain_word
    runtime.enable_compilation_cache(None)
    scorer = ClipScorer.from_folder(args.clip) if args.clip else None
    faces = faces_lib if faces_lib.available() else None
    if faces is None:
        log.warning("no face identity: %s", faces_lib.INSTALL_HINT)

    runs = {m: [] for m in args.methods}
    shown = {}
    for name, images in concepts.items():
        reference = data.read_image(images[0])
        shown[name] = [reference]
        for method in args.methods:
            log.info("== %s: %s", name, method)
            work = args.out / "concepts" / name / method.replace(" ", "_").replace("+", "_")
            learned = learn(method, args, images, work)
            pictures = draw(learned, args, work / "pictures")
            runs[method].append({**{k: learned[k] for k in ("seconds", "bytes", "images", "steps")},
                                 "scores": score(pictures, reference, args, scorer, faces)})
            shown[name].append(pictures[0])

    rows = [summarize(m, runs[m], faces) for m in args.methods]
    table = markdown_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    as_json = json.loads(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "concepts": list(concepts)}, default=str))
    (args.out / "results.json").write_text(json.dumps(as_json, indent=2) + "\n")
    method_figure(list(shown.values()), ["input", *args.methods], args.out / "figure.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
