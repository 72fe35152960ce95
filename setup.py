"""Trellis package build.

Always builds the pybind11 C++ helpers in csrc/ (dataset index builders). CUDA kernels are
compiled just in time on first use by `csrc/loader.py`, so an isolated pip build (which has
no torch) never needs a CUDA toolchain.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if cpp_sources:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension("trellis_cpp", cpp_sources, cxx_std=17, extra_compile_args=["-O3"])
    )

setup(
    name="trellis",
    version="0.1.0",
    description="Megatron-style 3D-parallel GPT pretraining and fine-tuning engine",
    packages=find_packages(include=["engine*", "models*", "parallel*", "csrc*", "tools*"]),
    py_modules=["pretrain_gpt"],
    package_data={"csrc": ["*.cu", "*.cpp", "*.h"]},
    ext_modules=ext_modules,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "sentencepiece", "tokenizers", "safetensors"],
    # megatron-core is pinned for the .bin/.idx compatibility tests; its own requirements are
    # torch>=2.6, numpy, packaging, so an installed CPU torch stays as it is.
    extras_require={"dev": ["pytest", "pybind11>=2.10", "transformers", "peft", "jinja2", "psutil", "megatron-core==0.16.1"]},
)
