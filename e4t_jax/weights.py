"""diffusers / transformers safetensors checkpoints <-> Flax parameter pytrees, no torch.

The mapping is driven by the *target* pytree (usually ``jax.eval_shape`` of a module's
init): every Flax leaf path names exactly one PyTorch state-dict key, obtained by
:func:`torch_key`, and the leaf's kind says how the tensor is laid out:

==========================  =========================  ==========================
Flax leaf                   PyTorch key suffix          transform
==========================  =========================  ==========================
``kernel`` (4-D, conv)      ``weight`` [O, I, kh, kw]  -> ``[kh, kw, I, O]``
``kernel`` (2-D, dense)     ``weight`` [O, I]          -> ``[I, O]`` (1x1 conv too)
``scale`` (norms)           ``weight``                 as is
``embedding``               ``weight``                 as is
anything else               same name                  as is
==========================  =========================  ==========================

Only safetensors files are read: pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) can
run arbitrary code when loaded, and are never loaded. Which files of a folder hold its
weights is one explicit rule (:func:`weight_files`), with diffusers' variant naming
(``--variant fp16``: ``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16.safetensors``);
an OpenCLIP checkpoint's files are found by :func:`openclip_files`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from e4t_jax import files
from e4t_jax.errors import UserError

PyTree = Any

# PyTorch ModuleList / Sequential attributes: their Flax names carry the index as
# ``name_i``. Other names that end in digits (``linear_1``, ``fc1``) are plain names.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers", "blocks",
})
_INDEXED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")
_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

# Old VAE checkpoints (e.g. the SD 1.x repositories) name the mid-block attention
# projections differently; diffusers renames them on load, and so do we.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def torch_key(path: tuple[str, ...]) -> str:
    """PyTorch state-dict key of a Flax parameter path.

    >>> torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel"))
    'down_blocks.0.resnets.1.conv1.weight'
    """
    parts = []
    for segment in path[:-1]:
        match = _INDEXED.match(segment)
        if match and match["name"] in LIST_NAMES:
            parts += [match["name"], match["index"]]
        else:
            parts.append(segment)
    parts.append(_RENAMED_LEAVES.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_flax(leaf_name: str, target_shape: tuple[int, ...], array: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel" and array.ndim == 4 and len(target_shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf_name == "kernel" and len(target_shape) == 2:
        if array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        return array.T
    return array


def _to_torch(leaf_name: str, array: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf_name == "kernel" and array.ndim == 2:
        return array.T
    return array


def normalize_legacy_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames old-style VAE attention keys (``query``/``key``/``value``/``proj_attn``)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_VAE_ATTENTION:
            parts[-2] = _LEGACY_VAE_ATTENTION[parts[-2]]
            key = ".".join(parts)
        out[key] = value
    return out


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    abstract_params: PyTree,
    *,
    dtype: Any = None,
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    what: str = "model",
    config_name: str = "config.json",
) -> PyTree:
    """Converts a PyTorch-layout state dict into a Flax params pytree.

    Args:
      state: key -> numpy array (e.g. from :func:`read_safetensors`).
      abstract_params: pytree of ``jax.ShapeDtypeStruct`` (or arrays) giving the
        target paths and shapes, e.g. ``jax.eval_shape(model.init, ...)["params"]``.
      dtype: cast every leaf to this dtype (default: the target leaf's dtype).
      prefix: a key prefix (``"text_model."``) that every wanted key carries.
      ignore: regular expressions of state-dict keys to drop silently (buffers such
        as ``position_ids``, heads of a bigger checkpoint).
      what: model name used in error messages.
      config_name: the config file that the error message asks to check.

    Raises:
      CheckpointError: listing every missing, unexpected or mis-shaped key.
    """
    state = normalize_legacy_keys(state)
    flat_target = traverse_util.flatten_dict(abstract_params)
    params, missing, bad_shape, used = {}, [], [], set()
    for path, leaf in flat_target.items():
        key = prefix + torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        array = _to_flax(path[-1], tuple(leaf.shape), np.asarray(state[key]))
        if tuple(array.shape) != tuple(leaf.shape):
            bad_shape.append(f"{key}: checkpoint {tuple(state[key].shape)}, model expects {tuple(leaf.shape)}")
            continue
        params[path] = array.astype(dtype or leaf.dtype)
    ignored = [re.compile(pattern) for pattern in ignore]
    unexpected = [
        key for key in state
        if key not in used and key.startswith(prefix) and not any(p.search(key) for p in ignored)
    ]
    if missing or unexpected or bad_shape:
        lines = [f"The checkpoint does not fit the {what} configuration:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", bad_shape)):
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                lines.append(f"  {len(keys)} {title}:\n    {shown}")
        lines.append(f"Check that the {config_name} beside the weights belongs to them.")
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(params)


def params_to_state_dict(params: PyTree, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_params`: a PyTorch-layout state dict."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {prefix + torch_key(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(v)))
            for path, v in flat.items()}


# ----------------------------------------------------------------------------- files


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one ``.safetensors`` file into numpy arrays (bfloat16 kept via ml_dtypes)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises plain Exceptions on corrupt headers
        raise CheckpointError(f"Could not read {path}: {e}. The file is damaged or not a safetensors file.") from e


WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names


def variant_name(filename: str, variant: str | None) -> str:
    """diffusers' and transformers' variant naming: the variant goes before the last suffix.

    >>> variant_name("model.safetensors.index.json", "fp16")
    'model.safetensors.index.fp16.json'
    """
    if not variant:
        return filename
    stem, suffix = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _no_weights(folder: Path, variant: str | None) -> CheckpointError:
    """The error for a folder without the weights asked for, naming what it holds."""
    found = sorted(f.name for f in folder.glob("*.safetensors*"))
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    asked = f"no {variant} weights" if variant else "no weights"
    if found:
        expected = " or ".join(variant_name(f"{name}.safetensors", variant) for name in WEIGHT_NAMES)
        hint = "; pass --variant to pick a variant" if not variant else ""
        return CheckpointError(f"{asked} in {folder} (expected {expected}); it holds {', '.join(found)}{hint}")
    if pickles:
        return CheckpointError(f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); e4t-jax never loads "
                               "pickles (they can run arbitrary code): use the model's safetensors files, or convert "
                               "it (load it in diffusers or transformers and save_pretrained(..., "
                               "safe_serialization=True))")
    return CheckpointError(f"No weights found in {folder}: expected *.safetensors files.")


def weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files that hold one component's weights (``unet/``, ``text_encoder/``, ...).

    The rule, first match wins, for NAME in ``diffusion_pytorch_model``, ``model``:

    1. ``NAME.safetensors`` (with a variant: ``NAME.VARIANT.safetensors``), one file;
    2. ``NAME.safetensors.index.json`` (``NAME.safetensors.index.VARIANT.json``): the
       shards its ``weight_map`` names;
    3. with no variant asked and no file of these names at all: the folder's only
       ``*.safetensors`` file.

    So with no variant the plain (full-precision) files are taken even when variant
    files (``*.fp16.*``) sit beside them, and a variant asked for is taken or refused,
    never replaced by another. ``folder`` may also be one ``.safetensors`` file.

    Raises:
      CheckpointError: no such files, naming what the folder holds.
    """
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise CheckpointError(f"No model weights at {folder}: the folder does not exist.")
    for name in WEIGHT_NAMES:
        single = folder / variant_name(f"{name}.safetensors", variant)
        if single.is_file():
            return [single]
        index = folder / variant_name(f"{name}.safetensors.index.json", variant)
        if index.is_file():
            return [folder / shard for shard in sorted(set(_weight_map(index).values()))]
    others = sorted(folder.glob("*.safetensors"))
    if not variant and len(others) == 1 and not any(f.name.startswith(WEIGHT_NAMES) for f in others):
        return others
    raise _no_weights(folder, variant)


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a sharded checkpoint's index file."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
        raise UserError(f"{index} has no weight_map of shard file names beside it")
    return weight_map


def load_state_dict(folder: str | os.PathLike, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads the weights of one model folder (``unet/``, ``text_encoder/``, ...), picked by
    :func:`weight_files`."""
    state = {}
    for file in weight_files(folder, variant):
        state.update(read_safetensors(file))
    return state


OPENCLIP_CONFIG = "open_clip_config.json"
# OpenCLIP's safetensors weight file names on the Hub, the preferred first.
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def _pickle_refused(file: Path) -> CheckpointError:
    return CheckpointError(
        f"{file} is a pickle checkpoint; e4t-jax never loads pickles (they can run arbitrary code): use the "
        "model's safetensors file, or convert it where you trust it (torch.load, then "
        f"safetensors.torch.save_file(state_dict, '{OPENCLIP_WEIGHTS[0]}')).")


def _openclip_weights(folder: Path) -> Path:
    """The weights file of an OpenCLIP folder: the first of :data:`OPENCLIP_WEIGHTS`, else its only safetensors."""
    named = [folder / name for name in OPENCLIP_WEIGHTS if (folder / name).is_file()]
    others = sorted(folder.glob("*.safetensors"))
    if named or len(others) == 1:
        return (named or others)[0]
    pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles and not others:
        raise _pickle_refused(pickles[0])
    raise CheckpointError(f"No OpenCLIP weights in {folder}: expected {' or '.join(OPENCLIP_WEIGHTS)}"
                          + (f"; it holds {', '.join(f.name for f in others)}" if others else "."))


def openclip_files(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """The ``(weights, config)`` files of an OpenCLIP checkpoint at ``path``; None where it is none.

    An OpenCLIP checkpoint is a folder holding :data:`OPENCLIP_CONFIG` and no ``config.json``
    (a folder with both, as some Hub repositories, is read as transformers'), its weights
    the first of :data:`OPENCLIP_WEIGHTS` there, else its only ``*.safetensors`` file; or
    one ``.safetensors`` file with :data:`OPENCLIP_CONFIG` beside it.

    Raises:
      CheckpointError: the weights are a pickle (``open_clip_pytorch_model.bin``), or missing.
    """
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise _pickle_refused(path)
    folder = path.parent if path.is_file() else path
    if not (folder / OPENCLIP_CONFIG).is_file() or (path.is_dir() and (folder / "config.json").is_file()):
        return None
    return (path if path.is_file() else _openclip_weights(folder)), folder / OPENCLIP_CONFIG


def save_safetensors(params: PyTree, path: str | os.PathLike, *, prefix: str = "",
                     metadata: dict[str, str] | None = None) -> None:
    """Writes a params pytree as a PyTorch-layout safetensors file (round-trips exactly)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(params_to_state_dict(params, prefix=prefix), str(path), metadata=metadata)
    files.honour_umask(path)


def save_pytree(tree: PyTree, path: str | os.PathLike) -> None:
    """Writes a nested dict of arrays as safetensors, keys joined by ``/`` (no layout change)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path))
    files.honour_umask(path)


def load_pytree(path: str | os.PathLike) -> PyTree:
    """Reads a file written by :func:`save_pytree` back into a nested dict of numpy arrays."""
    return traverse_util.unflatten_dict(read_safetensors(path), sep="/")


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a Hugging Face Hub repository (``owner/name``) rather than a local path."""
    text = str(text)
    return not Path(text).expanduser().exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


def hub_patterns(parts: Sequence[str] | None, variant: str | None = None) -> list[str]:
    """The ``allow_patterns`` of a Hub download: configs, tokenizer files and the weights
    that :func:`weight_files` reads, of ``parts`` only (None: a single-model repository,
    whose files are at its root).

    Root-level checkpoints, the safety checker, pickles and other variants are never fetched.
    """
    folders = [f"{part}/" for part in parts] if parts is not None else [""]
    patterns = ["model_index.json"] if parts is not None else []
    for folder in folders:
        patterns += [f"{folder}*.json", f"{folder}*.txt"]
        for name in WEIGHT_NAMES:
            single = variant_name(f"{name}.safetensors", variant)
            patterns += [f"{folder}{single}", f"{folder}{single[:-len('.safetensors')]}-*-of-*.safetensors"]
    return patterns


def single_model_patterns(files: Sequence[str] | None) -> list[str]:
    """The ``allow_patterns`` of a Hub repository that holds one model at its root (a CLIP
    vision tower), given its ``files``: transformers' configs and weights
    (:func:`hub_patterns` ``(None)``) where it has them, else :data:`OPENCLIP_CONFIG` and the
    first of :data:`OPENCLIP_WEIGHTS` it has. Pickles are never fetched.

    ``files`` None (the listing failed, e.g. offline): both formats' patterns, so that a
    cached snapshot is taken whichever it holds.

    Raises:
      CheckpointError: the repository has neither (only pickles, say).
    """
    openclip = [OPENCLIP_CONFIG, *OPENCLIP_WEIGHTS]
    if files is None:
        return hub_patterns(None) + openclip
    if {"model.safetensors", "model.safetensors.index.json"} & set(files):
        return hub_patterns(None)
    named = [name for name in OPENCLIP_WEIGHTS if name in files]
    if named and OPENCLIP_CONFIG in files:
        return [OPENCLIP_CONFIG, named[0]]
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    refused = f"; its pickles ({', '.join(pickles)}) are never loaded: convert them to safetensors." if pickles else "."
    raise CheckpointError("The repository has no safetensors weights that e4t-jax reads (model.safetensors with "
                          f"config.json, or {OPENCLIP_WEIGHTS[0]} with {OPENCLIP_CONFIG}){refused}")


def _repo_files(repo_id: str) -> list[str] | None:
    """A Hub repository's file names; None where they cannot be listed (offline)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id)
    except Exception:  # offline or unreachable: snapshot_download says which, or takes the cache
        return None


def resolve_model(path_or_id: str | os.PathLike, *, parts: Sequence[str] | None = PIPELINE_PARTS,
                  variant: str | None = None) -> Path:
    """A local model folder as is, or a Hugging Face Hub model id fetched to a local snapshot.

    Args:
      parts: the subfolders to fetch (default: those of a Stable Diffusion pipeline that
        e4t-jax reads; ``("image_encoder",)`` adds that one); None for a repository that
        holds one model at its root (a CLIP vision tower, transformers' or OpenCLIP's
        files: :func:`single_model_patterns`).
      variant: fetch the weight files of this variant (``fp16``) instead of the plain ones.

    Raises:
      FileNotFoundError: with instructions, when the id cannot be reached offline.
      CheckpointError: the repository has no weights that e4t-jax reads.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if not is_hub_id(text):
        raise FileNotFoundError(f"Model folder {text} does not exist.")
    patterns = hub_patterns(parts, variant) if parts is not None else single_model_patterns(_repo_files(text))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network down, gated repo, unknown id
        raise FileNotFoundError(
            f"Could not resolve '{text}' as a local folder or a Hugging Face Hub model id ({type(e).__name__}: {e}). "
            "When offline, download the model elsewhere (huggingface-cli download ID --local-dir DIR) and pass "
            "--model DIR.") from e


def read_json(file: str | os.PathLike) -> dict[str, Any]:
    """A model's JSON object file (a config, an index, ``model_index.json``), at most
    :data:`e4t_jax.files.MAX_JSON_BYTES`.

    Raises:
      FileNotFoundError: no such file.
      UserError: too large, not JSON (or too deeply nested), or not a JSON object.
    """
    files.check_size(file)
    try:
        value = json.loads(Path(file).read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{file} is not valid JSON ({str(error)[:200] or type(error).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} holds a JSON {type(value).__name__}, not the object a config is")
    return value


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict[str, Any]:
    """Reads a component's JSON config (:func:`read_json`), with a clear error when it is missing."""
    file = Path(folder) / name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {Path(folder)} is not a diffusers/transformers model folder.")
    return read_json(file)


@contextlib.contextmanager
def config_errors(config_file: str | os.PathLike) -> Iterator[None]:
    """Turns what parsing and checking a component's config raises into one :class:`UserError`
    line naming the file (``config_file``, or a folder's ``config.json``).

    A :class:`CheckpointError` or :class:`UserError` (already clear) passes as is.
    """
    path = Path(config_file)
    file = path / "config.json" if path.is_dir() else path
    try:
        yield
    except (UserError, CheckpointError):
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{file}: {reason}") from error
