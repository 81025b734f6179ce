"""What the command-line programs (``train/``, ``infer/``) share: the argument parser and
its checked number types, one-line errors, fast malloc.

Only the command-line programs import this module; the library reports user errors
with :class:`e4t_jax.errors.UserError`, which :func:`main_wrapper` prints as one line.
A bad flag value is refused by :class:`ArgumentParser` with one line and exit status 2,
before anything is loaded. A training run stopped by SIGTERM (a preemption) after its
checkpoint exits with :data:`e4t_jax.errors.EXIT_PREEMPTED` (75), printing how to resume.
"""
from __future__ import annotations

import argparse
import errno
import functools
import logging
import math
import os
import sys
from typing import Callable, NoReturn

from e4t_jax.errors import EXIT_PREEMPTED, Preempted, UserError

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
SEED_MAX = 2**32 - 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it is None, off or empty (the help text says what then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default in ("", []) or action.required:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and errors as one line (exit status 2)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounds(minimum: float | None, maximum: float | None, above: bool) -> str:
    low = "" if minimum is None else f"{'above' if above else 'at least'} {minimum:g}"
    high = "" if maximum is None else f"at most {maximum:g}"
    return " and ".join(filter(None, [low, high]))


def integer(minimum: int | None = None, maximum: int | None = None, *,
            multiple_of: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``[minimum, maximum]`` (and a multiple of ``multiple_of``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum, False)}, got {value}")
        if multiple_of and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *,
           above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[minimum, maximum]`` (``(minimum, ...`` with ``above``).

    ``nan`` and ``inf`` are always refused: they make black images or a dead run, silently.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if ((minimum is not None and (value < minimum or (above and value == minimum)))
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum, above)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def add_model(parser: argparse.ArgumentParser,
              help: str = "model folder, Hugging Face id, or preset (digits, tiny, medium)") -> None:
    """The required ``--model`` and its ``--variant`` (which weight files to read), for every CLI that loads one."""
    parser.add_argument("--model", required=True, help=help)
    parser.add_argument("--variant", default=None,
                        help="read the weight files of this variant (fp16: *.fp16.safetensors, diffusers' naming)")


POSITIVE = integer(1)            # steps, batch sizes, counts, widths
NON_NEGATIVE = integer(0)        # warm-up steps, "0: off" cadences, indexes
SEED = integer(0, SEED_MAX)
LEARNING_RATE = number(0, above=True)
PIXELS = integer(8, multiple_of=8)  # image sides: multiples of Stable Diffusion's VAE factor


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
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
        return f"no space left on device: free space or choose another --out ({str(error).splitlines()[0][:200]})"
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
        return ("out of memory: lower --batch-size or the resolution, use --dtype bfloat16, or turn on --remat "
                f"({str(error).splitlines()[0][:200]})")
    return None


def main_wrapper(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorates a CLI ``main(argv)``: user errors print one line and exit 2; a preempted run
    (:class:`e4t_jax.errors.Preempted`) prints how to resume and exits :data:`EXIT_PREEMPTED`.

    The wrapped function returns the exit status, also for argparse's exits (``--help``: 0,
    a bad flag: 2), so that tests and other callers can run a CLI in-process.
    """

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.captureWarnings(True)
        for noisy in ("absl", "orbax", "jax", "grain"):  # keep library chatter out of the CLI output
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return main(argv) or 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                return done.code or 0
            raise
        except Preempted as stopped:
            print(f"preempted: {stopped}", file=sys.stderr)
            return EXIT_PREEMPTED
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
