"""Packages fastdiff: the Python runtime, the Triton kernels of kernels/ as fastdiff.kernels, the C++
sources of csrc/ as package data (compiled on first use against the running torch:
fastdiff/ops/cpp_build.py says why), and the trained default model's weights (fastdiff/weights/).

Nothing is compiled here, so the build needs no torch: `pip install .` with build isolation
fetches only setuptools and wheel. fastdiff/kernels and fastdiff/csrc are links to the top-level
folders; kernels/ has no __init__.py, so a checkout's root on sys.path cannot hide an installed
distribution named `kernels` (transformers needs Hugging Face's).
"""
from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["fastdiff", "fastdiff.*"], exclude=["fastdiff.csrc", "fastdiff.*.__pycache__"])
package_data = {
    "fastdiff": ["csrc/*.cpp", "csrc/*.h"],
    # the trained default model (fastdiff.default_model, `make train-default`): two diffusers-layout folders
    "fastdiff.weights": ["*.json", "*/*.json", "*/*/*.json", "*/*/*.safetensors", "*/*/*.txt"],
}

setup(packages=packages, package_data=package_data)
