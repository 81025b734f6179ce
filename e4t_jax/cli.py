"""What the command-line programs (``train/``, ``infer/``) share: one-line errors, fast malloc.

Only the command-line programs import this module; the library reports user errors
with :class:`e4t_jax.errors.UserError`, which :func:`main_wrapper` prints as one line.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

from e4t_jax.errors import UserError

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


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
