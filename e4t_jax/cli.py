"""What every command-line program shares: clear errors, fast malloc, compile cache, safe output."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
DEFAULT_CACHE_DIR = Path(os.environ.get("E4T_CACHE_DIR", Path.home() / ".cache" / "e4t_jax" / "xla"))


class UserError(Exception):
    """An error the user can fix; the CLI prints its message alone and exits with status 2."""


def reexec_with_fast_malloc() -> None:
    """Restarts the process once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

    Without it glibc mmaps and unmaps every XLA buffer over 32 MiB on each call; on CPU
    that alone made a U-Net training step ~1.6x slower (see bench/RESULTS.md). The
    tunable is read only at process start, hence the re-exec. Set
    ``E4T_NO_REEXEC=1`` to disable.
    """
    if (sys.platform != "linux" or os.environ.get("E4T_NO_REEXEC") or "ipykernel" in sys.modules
            or MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")):
        return  # a notebook kernel must never be replaced mid-cell
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    env = dict(os.environ, GLIBC_TUNABLES=tunables, E4T_NO_REEXEC="1")
    argv = [sys.executable] + (["-m", _module_name()] if _module_name() else []) + sys.argv[(1 if _module_name() else 0):]
    os.execve(sys.executable, argv, env)


def _module_name() -> str | None:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache so a second run skips compilation."""
    import jax

    directory = Path(directory or DEFAULT_CACHE_DIR).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # JAX decides once per process; re-decide with the new folder
    return directory


def _user_message(error: BaseException) -> str | None:
    """The message for an error a user caused, or None for a bug (which keeps its traceback)."""
    from e4t_jax.weights import CheckpointError

    if isinstance(error, (UserError, CheckpointError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError)):
        return str(error)
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
        return ("out of memory: lower --batch-size or the resolution, use --dtype bfloat16, or turn on --remat "
                f"({str(error).splitlines()[0][:200]})")
    return None


def main_wrapper(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorates a CLI ``main(argv)``: user errors print one line and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.captureWarnings(True)
        for noisy in ("absl", "orbax", "jax", "grain"):  # keep library chatter out of the CLI output
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs below
            message = _user_message(error)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2

    return wrapped


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; moves it into place only on success.

    Works for files and directories: nothing half-written is ever left at ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
