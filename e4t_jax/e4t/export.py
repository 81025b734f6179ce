"""Export a personalized concept for PyTorch / diffusers users.

Writes into a folder (atomically: nothing is left there when it fails):

* ``learned_embeds.safetensors``: the textual-inversion embedding ``{placeholder: [1, D]}``
  (float32), the format diffusers' ``load_textual_inversion`` reads;
* ``unet/``: the base U-Net with the concept's weight offsets (the domain offsets plus
  its change of them) merged in (``diffusion_pytorch_model.safetensors`` + the base
  ``config.json``), for ``UNet2DConditionModel.from_pretrained``;
* ``e4t_concept.json`` (placeholder, domain word, base model, offsets) and ``README.md``;
* with ``full_pipeline``: every other component of the base model too (those listed
  in its ``model_index.json``), so the folder is a complete diffusers
  ``StableDiffusionPipeline`` that holds its own ``learned_embeds.safetensors``.

A tuned encoder head stored in the concept is not exported: diffusers needs only ``v*``
and the merged U-Net.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from e4t_jax import config as config_lib, files, pipeline, presets, weights
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.errors import UserError

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


def _check_out(out: Path, inputs: list, force: bool) -> None:
    """``out`` must be new or empty; with ``force``, a folder this export wrote before may be replaced.

    Inputs are never replaced, nor a folder that this program did not write (replacing
    a folder deletes what it holds)."""
    files.check_outputs([out], inputs=inputs, force=True)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / INFO_FILE).is_file():
        raise UserError(f"--out {out} exists and is not a folder that e4t-export wrote; choose another --out")
    if not force:
        raise UserError(f"--out {out} already holds an export; pass --force to replace it, or choose another --out")


def save_embedding(path: str | Path, placeholder: str, embedding) -> Path:
    """Writes ``{placeholder: float32 [1, D]}`` (``embedding``: ``[D]``), the textual-inversion
    file that diffusers' ``load_textual_inversion(path, token=placeholder)`` reads."""
    from safetensors.numpy import save_file

    with files.atomic_path(path) as tmp:
        save_file({placeholder: np.asarray(embedding, np.float32).reshape(1, -1)}, str(tmp))
    return Path(path)


def pipeline_components(model_folder: Path) -> list[str]:
    """Subfolders of the components that ``model_index.json`` lists (the U-Net excluded)."""
    index = weights.read_json(model_folder / "model_index.json")
    return sorted(name for name in index
                  if not name.startswith("_") and name != "unet" and (model_folder / name).is_dir())


def _readme(concept: concept_lib.Concept, model_id: str, full_pipeline: bool) -> str:
    load = ('pipe = StableDiffusionPipeline.from_pretrained("THIS_FOLDER")' if full_pipeline else
            f'unet = UNet2DConditionModel.from_pretrained("THIS_FOLDER/unet")\n'
            f'pipe = StableDiffusionPipeline.from_pretrained("{model_id}", unet=unet)')
    return _README.format(placeholder=concept.placeholder, domain_word=concept.config.model.domain_word,
                          model_id=model_id, load=load,
                          embedding_path="THIS_FOLDER" if full_pipeline else f"THIS_FOLDER/{EMBEDDING_FILE}")


def export_concept(concept_file: str | Path, model: str | Path, out: str | Path, *, full_pipeline: bool = False,
                   dtype: str = "float32", force: bool = False, variant: str | None = None) -> Path:
    """Writes a concept as diffusers files into ``out`` (layout in the module docstring).

    Args:
      concept_file: a concept written by :func:`e4t_jax.e4t.concept.save_concept`.
      model: the base model (folder, Hub id or preset name) it was personalized on.
      out: the output folder; it must not exist or be empty, or (with ``force``) hold
        an earlier export.
      full_pipeline: also copy the base model's other components.
      dtype: ``"float32"`` or ``"float16"``, the merged U-Net's stored dtype.
      force: replace an earlier export in ``out``.
      variant: the base model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).

    Returns:
      ``out``.

    Raises:
      ConceptError: ``concept_file`` is not a concept, or was made for another base model.
      UserError: ``out`` is not free.
      FileNotFoundError: a missing concept file or model folder (or ``model_index.json``
        with ``full_pipeline``).
    """
    out = Path(out)
    _check_out(out, [concept_file, model], force)
    model_folder = pipeline.resolve(model, variant)
    if full_pipeline and not (model_folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_folder} has no model_index.json: --full-pipeline needs a diffusers "
                                "StableDiffusionPipeline folder")
    concept_lib.read_concept(concept_file)  # a foreign file fails here, before the model is loaded
    sd, params, tokenizer = pipeline.load_model(model, variant=variant)
    concept = concept_lib.load_concept(concept_file, sd, tokenizer)
    unet_params = params["unet"]
    if concept.domain is not None:  # the U-Net that generation samples this concept with
        unet_params = jax.device_get(offsets_lib.compose_offsets(unet_params, concept.domain, (concept.delta,),
                                                                 concept.config.offsets))
    unet_params = jax.tree.map(lambda leaf: np.asarray(leaf, DTYPES[dtype]), unet_params)
    model_id = str(model_folder) if presets.is_preset(str(model)) else str(model)
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        if full_pipeline:
            for component in pipeline_components(model_folder):
                shutil.copytree(model_folder / component, tmp / component)
            shutil.copy2(model_folder / "model_index.json", tmp / "model_index.json")
        weights.save_safetensors(unet_params, tmp / "unet" / UNET_WEIGHTS, metadata={"format": "pt"})
        shutil.copy2(model_folder / "unet" / "config.json", tmp / "unet" / "config.json")
        save_embedding(tmp / EMBEDDING_FILE, concept.placeholder, concept.embedding)
        info = {"placeholder": concept.placeholder, "domain_word": concept.config.model.domain_word,
                "base_model": concept.header["base_model"], "model_id": model_id,
                "offsets": config_lib.to_dict(concept.config.offsets), "concept_file": Path(concept_file).name,
                "unet_dtype": dtype, "full_pipeline": full_pipeline}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(concept, model_id, full_pipeline))
    return out
