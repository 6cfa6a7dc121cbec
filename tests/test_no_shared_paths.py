"""The library, its docs and benchmarks never point into the team's ``../shared`` folder: a user has none.

Tests and CI may read ``../shared/data/``; everything else names where a thing comes from (a release, a URL).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = re.compile(r"(\.\./shared/|/work/shared)")


def test_nothing_outside_the_tests_points_into_the_shared_folder():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if name.startswith(("tests/", ".ci/")) or not (ROOT / name).is_file():
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binaries
        hits += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if SHARED.search(line)]
    assert not hits, f"paths into the shared folder: {hits}"
