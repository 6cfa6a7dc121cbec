"""`streamhash demo --json` end to end (needs Fashion-MNIST; `make data` provides it)."""

import json
import subprocess
import sys

import pytest

from streamhash.data.fashion_mnist import find_dir
from streamhash.errors import DatasetMissingError

pytestmark = pytest.mark.integration

try:
    find_dir()
    HAVE_DATA = True
except DatasetMissingError:
    HAVE_DATA = False


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (make data)")
def test_demo_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "streamhash", "demo", "--limit", "1500", "--queries", "40", "--probes", "10", "--json",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["produced"] == 1500 and summary["indexed"] == 1500
    assert summary["malformed_sent"] == summary["dead_lettered"] == 8
    for key in ("ingest_images_per_s", "freshness_p99_s", "query_p50_ms", "query_p99_ms", "precision_at_10"):
        assert summary[key] > 0, key
    assert summary["freshness_probes"] == 10 and summary["queries"] == 40
    assert summary["precision_at_10"] > 0.2  # random ranking on 10 classes gives ~0.1
