"""Build the C core of clipdecomp as the extension module ``clipdecomp._core``.

One build runs on any x86-64: the SIMD kernels carry their own ``target`` attributes and are
chosen at run time (csrc/cpu.c), so nothing here asks for ``-march=native``.
"""
import glob
import os
import sys

import numpy as np
from setuptools import Extension, setup

sources = sorted(
    s for s in glob.glob("csrc/*.c")
)
cflags = ["-O3", "-std=c11", "-fopenmp", "-Wall", "-Wextra", "-fno-math-errno"]
ldflags = ["-fopenmp"]
if os.environ.get("CLIPDECOMP_SANITIZE"):
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    ldflags += ["-fsanitize=address,undefined"]
if sys.platform == "darwin":  # Apple clang: OpenMP through libomp when present
    cflags = [f for f in cflags if f != "-fopenmp"] + ["-Xpreprocessor", "-fopenmp"]
    ldflags = ["-lomp"]

setup(
    ext_modules=[
        Extension(
            "clipdecomp._core",
            sources=sources,
            include_dirs=["csrc", np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION")],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ]
)
