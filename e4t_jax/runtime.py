"""Process-wide JAX settings shared by the CLIs and the notebooks."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("E4T_CACHE_DIR", Path.home() / ".cache" / "e4t_jax" / "xla"))


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache so a second run skips compilation.

    Args:
      directory: the cache folder (default ``$E4T_CACHE_DIR`` or ``~/.cache/e4t_jax/xla``).

    Returns:
      The folder, created if needed.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = Path(directory or DEFAULT_CACHE_DIR).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # JAX decides once per process; re-decide with the new folder
    return directory
