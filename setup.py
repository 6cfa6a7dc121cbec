"""Build hook for the optional native Hamming kernel; all other metadata lives in pyproject.toml.

The extension is ``optional``: without a working C compiler the build logs a warning and the
package installs anyway, and :mod:`streamhash.index.hamming` falls back to its numpy backend.
"""

import sys

from setuptools import Extension, setup

# -O3 for the scan loops; no -march flags: the kernel picks AVX-512/POPCNT paths at run time,
# so a wheel built here still runs on an older CPU.
extra = [] if sys.platform == "win32" else ["-O3", "-std=c11"]

setup(
    ext_modules=[
        Extension(
            "streamhash.index._hamming",
            sources=["streamhash/index/_hamming.c"],
            extra_compile_args=extra,
            optional=True,
        )
    ]
)
