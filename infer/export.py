"""Export a personalized concept for PyTorch / diffusers users.

Example::

    e4t-export --concept me.safetensors --model runwayml/stable-diffusion-v1-5 --out me-diffusers/
    e4t-export --concept me.safetensors --model tiny --out me-pipeline/ --full-pipeline

Writes into ``--out`` (atomically: nothing is left there when it fails):

* ``learned_embeds.safetensors``: the textual-inversion embedding ``{placeholder: [1, D]}``
  (float32), the format diffusers' ``load_textual_inversion`` reads;
* ``unet/``: the base U-Net with the concept's weight offsets merged in
  (``diffusion_pytorch_model.safetensors`` + the base ``config.json``), for
  ``UNet2DConditionModel.from_pretrained``;
* ``e4t_concept.json`` (placeholder, domain word, base model, offsets) and ``README.md``;
* with ``--full-pipeline``: every other component of the base model too (those listed
  in its ``model_index.json``), so the folder is a complete diffusers
  ``StableDiffusionPipeline`` that holds its own ``learned_embeds.safetensors``.

A tuned encoder head stored in the concept is not exported: diffusers needs only ``v*``
and the merged U-Net.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from e4t_jax import cli

log = logging.getLogger("e4t.export")
EMBEDDING_FILE = "learned_embeds.safetensors"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
INFO_FILE = "e4t_concept.json"
DTYPES = {"float32": np.float32, "float16": np.float16}

_README = """# E4T concept `{placeholder}` for diffusers

Personalized with e4t-jax on `{model_id}` (domain word: "{domain_word}").
`unet/` is that model's U-Net with the concept's weight offsets merged in;
`learned_embeds.safetensors` is the word embedding of the placeholder `{placeholder}`.

```python
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

{load}
pipe.load_textual_inversion("{embedding_path}", token="{placeholder}")
image = pipe("a photo of {placeholder}").images[0]
```
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e4t-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", type=Path, required=True, help="concept file from e4t-personalize")
    p.add_argument("--model", default="tiny",
                   help="the base model the concept was personalized on: folder, Hugging Face id, or preset 'tiny'")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--full-pipeline", action="store_true",
                   help="also copy the base model's other components: a complete diffusers pipeline folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the merged U-Net weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def _check_out(out: Path, model_folder: Path, overwrite: bool) -> None:
    out, model_folder = out.resolve(), model_folder.resolve()
    if out == model_folder or out in model_folder.parents:
        raise cli.UserError(f"--out {out} would replace the base model folder {model_folder}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise cli.UserError(f"--out {out} already exists and is not an empty folder; pass --overwrite to replace it")


def _pipeline_components(model_folder: Path) -> list[str]:
    """Subfolders of the components that ``model_index.json`` lists (the U-Net excluded)."""
    index = json.loads((model_folder / "model_index.json").read_text())
    return sorted(name for name in index
                  if not name.startswith("_") and name != "unet" and (model_folder / name).is_dir())


def _readme(header: dict, full_pipeline: bool) -> str:
    load = ('pipe = StableDiffusionPipeline.from_pretrained("THIS_FOLDER")' if full_pipeline else
            f'unet = UNet2DConditionModel.from_pretrained("THIS_FOLDER/unet")\n'
            f'pipe = StableDiffusionPipeline.from_pretrained("{header.get("model_id")}", unet=unet)')
    return _README.format(placeholder=header["placeholder"], domain_word=header.get("domain_word"),
                          model_id=header.get("model_id"), load=load,
                          embedding_path="THIS_FOLDER" if full_pipeline else f"THIS_FOLDER/{EMBEDDING_FILE}")


def export_concept(concept_file: str | Path, model: str | Path, out: str | Path, *, full_pipeline: bool = False,
                   dtype: str = "float32", overwrite: bool = False) -> Path:
    """Writes a concept as diffusers files into ``out`` (layout in the module docstring).

    Args:
      concept_file: a concept written by :func:`e4t_jax.e4t.concept.save_concept`.
      model: the base model (folder, Hub id or preset name) it was personalized on.
      out: the output folder; it must not exist or be empty unless ``overwrite``.
      full_pipeline: also copy the base model's other components.
      dtype: ``"float32"`` or ``"float16"``, the merged U-Net's stored dtype.
      overwrite: replace a non-empty ``out``.

    Returns:
      ``out``.

    Raises:
      ConceptError: ``concept_file`` is not a concept, or was made for another base model.
      cli.UserError: ``out`` is not free.
      FileNotFoundError: a missing concept file or model folder (or ``model_index.json``
        with ``full_pipeline``).
    """
    import jax
    from safetensors.numpy import save_file

    from e4t_jax import pipeline, tiny, weights
    from e4t_jax.e4t import concept as concept_lib
    from e4t_jax.e4t import offsets as offsets_lib

    out = Path(out)
    model_folder = pipeline.resolve(model)
    _check_out(out, model_folder, overwrite)
    if full_pipeline and not (model_folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_folder} has no model_index.json: --full-pipeline needs a diffusers "
                                "StableDiffusionPipeline folder")
    concept_lib.read_concept(concept_file)  # a foreign file fails here, before the model is loaded
    sd, params, tokenizer = pipeline.load_model(model)
    try:
        loaded = concept_lib.load_concept(concept_file, sd, tokenizer)
    except concept_lib.ConceptError:
        raise
    except ValueError as e:  # the tokenizer refuses the placeholder (e.g. it is a word of this vocabulary)
        raise concept_lib.ConceptError(f"{concept_file}: {e}") from e
    unet_params = params["unet"]
    if loaded.concept.offsets is not None:
        unet_params = offsets_lib.merge_offsets(unet_params, loaded.concept.offsets, loaded.offset_config)
    unet_params = jax.tree.map(lambda leaf: np.asarray(leaf, DTYPES[dtype]), unet_params)
    header = dict(loaded.header, model_id=str(model_folder) if str(model) in tiny.PRESETS else str(model))
    with cli.atomic_path(out) as tmp:
        tmp.mkdir()
        if full_pipeline:
            for component in _pipeline_components(model_folder):
                shutil.copytree(model_folder / component, tmp / component)
            shutil.copy2(model_folder / "model_index.json", tmp / "model_index.json")
        weights.save_safetensors(unet_params, tmp / "unet" / UNET_WEIGHTS, metadata={"format": "pt"})
        shutil.copy2(model_folder / "unet" / "config.json", tmp / "unet" / "config.json")
        embedding = np.asarray(loaded.concept.embedding, np.float32).reshape(1, -1)
        save_file({loaded.placeholder: embedding}, str(tmp / EMBEDDING_FILE))
        info = {"placeholder": loaded.placeholder, "domain_word": header.get("domain_word"),
                "base_model": header.get("base_model"), "model_id": header["model_id"],
                "offsets": header.get("offsets"), "concept_file": Path(concept_file).name,
                "unet_dtype": dtype, "full_pipeline": full_pipeline}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(header, full_pipeline))
    return out


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.concept.is_file():
        raise cli.UserError(f"concept file {args.concept} does not exist")
    from e4t_jax.e4t.concept import ConceptError

    try:
        out = export_concept(args.concept, args.model, args.out, full_pipeline=args.full_pipeline,
                             dtype=args.dtype, overwrite=args.overwrite)
    except ConceptError as e:
        raise cli.UserError(str(e)) from e
    log.info("wrote %s (%s)", out, "a full diffusers pipeline" if args.full_pipeline else f"unet/ and {EMBEDDING_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
