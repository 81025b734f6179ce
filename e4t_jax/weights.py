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

Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) can run arbitrary code when loaded,
so they are refused unless the caller passes ``allow_pickle=True``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

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
        lines.append("Check that the config.json beside the weights belongs to them.")
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


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    import torch  # only reached after an explicit opt-in

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def load_state_dict(folder: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads the weights of one model folder (``unet/``, ``text_encoder/``, ...).

    Accepts a single ``*.safetensors`` file or a sharded set described by a
    ``*.safetensors.index.json``. Prefers ``diffusion_pytorch_model.safetensors`` /
    ``model.safetensors``; ignores variants (``*.fp16.safetensors``) unless alone.
    """
    folder = Path(folder)
    if folder.is_file():
        files = [folder]
    elif not folder.is_dir():
        raise CheckpointError(f"No model weights at {folder}: the folder does not exist.")
    else:
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            index = json.loads(indexes[0].read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        else:
            singles = sorted(folder.glob("*.safetensors"))
            plain = [f for f in singles if f.name.count(".") == 1]
            files = plain[:1] or singles[:1]
    if files and files[0].suffix == ".safetensors":
        state = {}
        for file in files:
            state.update(read_safetensors(file))
        return state
    pickles = sorted(p for p in ([folder] if folder.is_file() else folder.iterdir()) if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise CheckpointError(f"No weights found in {folder}: expected *.safetensors files.")
    if not allow_pickle:
        raise CheckpointError(
            f"{pickles[0]} is a pickle checkpoint; loading it can run arbitrary code. Convert it to "
            "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust its source.")
    return _read_pickle(pickles[0])


def save_safetensors(params: PyTree, path: str | os.PathLike, *, prefix: str = "",
                     metadata: dict[str, str] | None = None) -> None:
    """Writes a params pytree as a PyTorch-layout safetensors file (round-trips exactly)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(params_to_state_dict(params, prefix=prefix), str(path), metadata=metadata)


def save_pytree(tree: PyTree, path: str | os.PathLike) -> None:
    """Writes a nested dict of arrays as safetensors, keys joined by ``/`` (no layout change)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path))


def load_pytree(path: str | os.PathLike) -> PyTree:
    """Reads a file written by :func:`save_pytree` back into a nested dict of numpy arrays."""
    return traverse_util.unflatten_dict(read_safetensors(path), sep="/")


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """A local model folder, or a Hugging Face Hub model id resolved to a local snapshot.

    Raises:
      FileNotFoundError: with instructions, when the id cannot be reached offline.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"Model folder {text} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            text, allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer/*", "scheduler/*"],
            ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.msgpack", "*.onnx*"]))
    except Exception as e:  # network down, gated repo, unknown id
        raise FileNotFoundError(
            f"Could not resolve '{text}' as a local folder or a Hugging Face Hub model id ({type(e).__name__}: {e}). "
            "When offline, download the model elsewhere (huggingface-cli download ID --local-dir DIR) and pass "
            "--model DIR.") from e


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    """Reads a component's JSON config, with a clear error when it is missing."""
    file = Path(folder) / name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {Path(folder)} is not a diffusers/transformers model folder.")
    return json.loads(file.read_text())
