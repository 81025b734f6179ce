"""Shared pytest set-up: CPU only, no network, deterministic."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("E4T_NO_REEXEC", "1")  # CLIs run in-process; never re-exec pytest

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Presets and compilation caches live in a per-session temporary home, not in ~/.cache.
_HOME = Path(tempfile.mkdtemp(prefix="e4t-test-home-"))
os.environ.setdefault("E4T_HOME", str(_HOME))
os.environ.setdefault("E4T_CACHE_DIR", str(_HOME / "xla"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny diffusers-format Stable Diffusion folder (random weights), shared by all tests."""
    from e4t_jax import presets

    return presets.write_model(tmp_path_factory.mktemp("tiny-sd") / "model", "tiny", seed=0)
