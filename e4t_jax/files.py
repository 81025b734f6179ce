"""File helpers that several layers share: atomic writes, the checks that keep a program
from overwriting what it did not make, the base-model identity, and the orbax directory
of a pre-trained domain encoder.

An exported domain encoder is a standalone orbax directory with two items:
``params`` (``{"encoder": ..., "offsets": ...}``) and ``config`` (JSON, holding a
``base_model`` identity from :func:`base_model_identity` that :func:`load_encoder`
checks against the model it is used with).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

from e4t_jax.errors import UserError

PyTree = Any

#: The largest JSON (or tokenizer) file of a model or encoder that is read: 16 MiB. Configs
#: are a few KiB; CLIP's tokenizer.json, the largest file of the kind, is 3.5 MiB.
MAX_JSON_BYTES = 2**24

IDENTITY_NAMES = {
    "text_width": "text width",
    "cross_attention_dim": "U-Net cross-attention width",
    "unet_config_sha256": "U-Net config fingerprint (sha256)",
    "unet_architecture": "U-Net architecture",
}


def move_into_place(new: Path, target: Path, staging: Path) -> None:
    """Renames the finished ``new`` (inside the folder ``staging``, beside ``target``) to ``target``.

    A file replaces an old one in one rename. An old folder is first renamed into
    ``staging``, then the new one takes its name: a crash between the two renames leaves
    no ``target`` (the old one complete in ``staging``), never a mix of old and new.
    """
    honour_umask(new)
    old = staging / ".old"
    if target.is_dir() and new.is_dir():
        os.rename(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old.exists():
            os.rename(old, target)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; moves it into place only on success.

    Works for files and directories: a crash or an error at any point leaves the old
    complete ``target`` or the new complete one (or, for a folder replaced in the instant
    between two renames, none: :func:`move_into_place`), never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp_dir / target.name
        move_into_place(tmp_dir / target.name, target, tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def check_size(file: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> None:
    """Refuses a file of a model larger than ``limit`` bytes before it is read.

    Raises:
      UserError: naming the file, its size and the limit.
    """
    size = os.path.getsize(file)
    if size > limit:
        raise UserError(f"{file} is {size} bytes, over the limit of {limit} for this kind of file "
                        "(e4t_jax.files.MAX_JSON_BYTES): it is no config or tokenizer file")


def save_image(image_uint8: Any, path: str | os.PathLike) -> None:
    """Writes a uint8 ``[H, W, 3]`` array as a PNG file, atomically (:func:`atomic_path`)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image_uint8).save(tmp, format="PNG")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Gives ``path`` (and, for a folder, everything in it) the modes of a plain ``open``:
    ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders.

    Temporary folders and safetensors' writer create owner-only (0600/0700) entries; what
    a program hands to the user should be readable as the user's umask says.
    """
    mask, path = _umask(), Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for entry in entries:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def _overlaps(output: Path, source: Path) -> bool:
    """Whether writing ``output`` could change ``source``: the same path, or one inside the other."""
    output, source = output.resolve(), source.resolve()
    return output == source or source in output.parents or output in source.parents


def check_outputs(outputs: Iterable[str | os.PathLike], *, inputs: Iterable[str | os.PathLike | None] = (),
                  force: bool = False, hint: str = "pass --force to replace it, or choose another --out") -> None:
    """Refuses, before any work, outputs that would lose a file.

    An output may never be an input, lie inside an input folder or hold an input, even
    with ``force``; an output that exists is refused unless ``force``.

    Args:
      outputs: the files (or folders) about to be written.
      inputs: what the program reads; Hub ids, preset names and None are skipped.
      force: replace existing outputs.
      hint: what the user can do about an existing output.

    Raises:
      UserError: naming the output, and what to do.
    """
    sources = [Path(source) for source in inputs if source is not None and Path(source).exists()]
    for output in map(Path, outputs):
        for source in sources:
            if _overlaps(output, source):
                raise UserError(f"{output} would overwrite the input {source}; choose another output path")
        if output.exists() and not force:
            raise UserError(f"{output} already exists; {hint}")


def check_folder(folder: str | os.PathLike, owned: Collection[str], program: str, *,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuses an output folder that holds anything ``program`` does not write there.

    The folder may be new, empty, or hold only entries named in ``owned`` (what
    ``program`` wrote there before: it continues or replaces its own work).

    Raises:
      UserError: the folder is a file, overlaps an input, or holds foreign entries.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; {program} writes a folder: choose another --out")
    check_outputs([folder], inputs=inputs, force=True)
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in owned) if folder.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{folder} holds files that {program} did not write ({shown}); choose another --out")


def absolute(directory: str | os.PathLike) -> str:
    """Orbax wants absolute paths; URLs (gs://...) are kept as they are."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))


def base_model_identity(unet_architecture: dict[str, Any], text_width: int) -> dict[str, Any]:
    """What trained add-ons (encoders, concepts) depend on in the base model.

    Args:
      unet_architecture: the U-Net's parsed architecture, the fields that fix its
        parameter shapes (:meth:`e4t_jax.models.unet.UNetConfig.architecture`): a re-saved
        or mirrored copy of the same model has the same one, whatever its config file's
        key order, bookkeeping keys or newer defaults.
      text_width: the text encoder's hidden size (768 for SD 1.x, 1024 for SD 2.x).

    Returns:
      ``{"text_width", "cross_attention_dim", "unet_architecture"}`` (JSON values).
    """
    architecture = json.loads(json.dumps(unet_architecture))  # tuples -> lists, as read back from JSON
    return {"text_width": int(text_width), "cross_attention_dim": architecture["cross_attention_dim"],
            "unet_architecture": architecture}


def legacy_fingerprint(unet_config: dict[str, Any]) -> str:
    """How earlier files recorded the U-Net: a sha256 of its ``config.json`` (sorted keys,
    without ``_...`` keys), under ``unet_config_sha256``. Kept to check such files (the shipped
    digits encoder is one); a re-saved config changes it, so new files record the architecture."""
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()


def identity_mismatches(saved: Any, expected: dict[str, Any]) -> list[str]:
    """Readable ``"text width 768; this model has 32"`` lines where a saved identity differs.

    ``expected`` may hold both U-Net records (``unet_architecture`` and the legacy
    ``unet_config_sha256``); only those the saved identity holds are compared, and a
    saved identity with neither is foreign.
    """
    saved = saved if isinstance(saved, dict) else {}
    if not any(key in saved for key in ("unet_architecture", "unet_config_sha256")):
        return ["an unknown U-Net (no base-model identity recorded)"]
    lines = []
    for key, value in expected.items():
        if key not in saved and key in ("unet_architecture", "unet_config_sha256"):
            continue
        if key == "unet_architecture" and isinstance(saved[key], dict):
            lines += [f"U-Net {field} {saved[key].get(field)}; this model has {wanted}"
                      for field, wanted in value.items() if saved[key].get(field) != wanted]
        elif saved.get(key) != value:
            lines.append(f"{IDENTITY_NAMES.get(key, key)} {saved.get(key)}; this model has {value}")
    return lines


def _encoder_checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        params=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()))


def staging_folder(target: str | os.PathLike) -> Path:
    """Where :func:`export_encoder` writes before the rename: ``.NAME.tmp`` beside ``target``, the same
    on every process (all of them take part in an orbax save)."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp"


def export_encoder(directory: str | os.PathLike, *, encoder_params: PyTree, offsets: PyTree,
                   config: dict[str, Any], overwrite: bool = False) -> None:
    """Writes a standalone domain-encoder checkpoint (params + offsets + config); every process calls it.

    A local ``directory`` is written atomically: into :func:`staging_folder`, then renamed
    into place by process 0 (:func:`move_into_place`): a crash or a failed write leaves
    the old encoder or the new one, never a partial one. A URL (``gs://``) is written in place.

    Args:
      directory: the new checkpoint directory.
      encoder_params: the encoder's params pytree (nested dicts of arrays).
      offsets: the weight-offset pytree (may be empty).
      config: JSON-able; must hold ``base_model`` (see :func:`base_model_identity`).
      overwrite: replace an existing directory.

    Raises:
      FileExistsError: ``directory`` exists and not ``overwrite``.
    """
    import jax
    import orbax.checkpoint as ocp

    if "base_model" not in config:
        raise ValueError("the encoder config needs a 'base_model' entry (see base_model_identity) so that "
                         "load_encoder can check the base model it is used with")
    path = absolute(directory)
    args = ocp.args.Composite(params=ocp.args.StandardSave({"encoder": encoder_params, "offsets": offsets}),
                              config=ocp.args.JsonSave(config))
    if "://" in path:
        _encoder_checkpointer().save(path, args=args, force=overwrite)
        return
    target, staging = Path(path), staging_folder(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed export left
    try:
        _encoder_checkpointer().save(str(staging / target.name), args=args, force=True)
        if jax.process_index() == 0:
            move_into_place(staging / target.name, target, staging)
    finally:
        if jax.process_index() == 0:
            shutil.rmtree(staging, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"e4t-export-encoder-{target.name}")


def read_encoder_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of an exported encoder, without reading its arrays.

    Raises:
      FileNotFoundError: the directory is missing or not an encoder checkpoint.
      UserError: its config item is over :data:`MAX_JSON_BYTES`, not
        JSON, or not a JSON object.
    """
    import orbax.checkpoint as ocp

    path = absolute(directory)
    if "://" not in path:
        if not os.path.isdir(os.path.join(path, "config")):
            what = "does not exist" if not os.path.exists(path) else "is not an exported E4T encoder (no config item)"
            raise FileNotFoundError(f"encoder checkpoint {path} {what}")
        for entry in Path(path, "config").iterdir():
            check_size(entry)
    try:
        config = _encoder_checkpointer().restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"encoder checkpoint {path}: its config item is not valid JSON ({error})") from None
    if not isinstance(config["config"], dict):
        raise UserError(f"encoder checkpoint {path}: its config item is a JSON {type(config['config']).__name__}, "
                        "not an object")
    return config["config"]


def load_encoder(directory: str | os.PathLike, *, expected: dict[str, Any] | None,
                 sharding: Any = None) -> tuple[PyTree, PyTree, dict[str, Any]]:
    """Loads ``(encoder_params, offsets, config)`` exported by :func:`export_encoder`.

    Args:
      directory: the encoder checkpoint.
      expected: the identity of the base model it will be used with
        (:func:`base_model_identity`, compared by :func:`identity_mismatches`); None skips the check.
      sharding: a ``jax.sharding.Sharding`` for every array (default: the first local device).

    Raises:
      FileNotFoundError: the directory is missing, not an encoder checkpoint, or has no params item.
      UserError: its config is unreadable (:func:`read_encoder_config`).
      ValueError: the encoder was pre-trained for another base model.
    """
    import jax
    import orbax.checkpoint as ocp

    path = absolute(directory)
    config = read_encoder_config(path)
    if expected is not None:
        mismatches = identity_mismatches(config.get("base_model", {}), expected)
        if mismatches:
            raise ValueError(f"encoder {path} was pre-trained for a base model with " + ", and ".join(mismatches)
                             + ". Use the base model it was trained with, or pre-train an encoder for this one.")
    if "://" not in path and not os.path.isdir(os.path.join(path, "params")):
        raise FileNotFoundError(f"encoder checkpoint {path} is incomplete: it has no params item (the head's weights)")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = _encoder_checkpointer()
    tree = checkpointer.metadata(path).item_metadata["params"].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    params = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return params["encoder"], params["offsets"], config
