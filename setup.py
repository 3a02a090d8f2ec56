"""Builds csrc/ into fastdiff._C, installs kernels/ as fastdiff.kernels and ships the trained
default model's weights (fastdiff/weights/) as package data.

FASTDIFF_SKIP_EXT=1 installs without the C++ extension (reference and Triton backends still work).
SIMD paths (AVX-512 + BF16 dot products, AVX2) are compiled into one binary with per-function
target attributes and picked at run time from the CPU's flags, so no -march flag is needed here.
"""
import glob
import os

from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"]
package_dir = {"fastdiff.kernels": "kernels"}
ext_modules, cmdclass = [], {}

if os.environ.get("FASTDIFF_SKIP_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "fastdiff._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=["-O3", "-fopenmp", "-std=c++20", "-Wall", "-Wno-unknown-pragmas"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

# the trained default model (fastdiff.default_model, `make train-default`): two diffusers-layout folders,
# listed as (namespace) packages so that setuptools takes their files as data
packages += find_namespace_packages(include=["fastdiff.weights", "fastdiff.weights.*"])
package_data = {"fastdiff.weights": ["*.json", "*/*.json", "*/*/*.json", "*/*/*.safetensors", "*/*/*.txt"]}

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules, cmdclass=cmdclass)
