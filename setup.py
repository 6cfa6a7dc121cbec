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
            # one module from four files (what each holds: _hamming.h); the header is a dependency so
            # an edit to it rebuilds them all
            sources=[
                "streamhash/index/_hamming.c",
                "streamhash/index/_hamming_scan.c",
                "streamhash/index/_hamming_avx512.c",
                "streamhash/index/_hamming_mih.c",
            ],
            depends=["streamhash/index/_hamming.h"],
            extra_compile_args=extra,
            optional=True,
        )
    ]
)
