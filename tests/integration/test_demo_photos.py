"""`streamhash demo --dataset cifar10 --json` end to end on the shared CIFAR-10 tarball: a small stream of photos
through the frozen EfficientNet-Lite0 (worker, learner, query server on the embedded broker), precision@10 after
learning not below before; and without CIFAR-10, the loader's message saying where to get it (exit 3)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from streamhash.errors import EXIT_DATASET_MISSING
from streamhash.eval.cifar import MODEL
from streamhash.services.demo.photos import DEMO_CUT
from streamhash.lifetime import die_with_parent
from tests.data.test_cifar10 import TARBALL
from tests.support import scaled

pytestmark = pytest.mark.integration

LIMIT = 150  # photos: the worker's frozen part runs 30-100 a second on a busy 2-core machine


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMHASH_DATA__CIFAR10", "STREAMHASH_MODEL__"))}
    return {**env, **extra}


@pytest.mark.skipif(not TARBALL.exists(), reason=f"the shared CIFAR-10 tarball is not at {TARBALL}")
def test_photo_demo_learns_and_reports_precision(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "streamhash", "demo", "--dataset", "cifar10", "--limit", str(LIMIT), "--queries", "20",
         "--probes", "3", "--json", "--workdir", str(tmp_path / "demo")],
        env=_env(STREAMHASH_DATA__CIFAR10_DIR=str(TARBALL)), capture_output=True, text=True, timeout=scaled(240),
        preexec_fn=die_with_parent(signal.SIGTERM))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["dataset"] == "cifar10" and summary["late_class_name"] == "truck"
    assert (summary["cut"], summary["input_size"]) == (DEMO_CUT, MODEL["input_size"])  # the eval's size, the demo's cut
    assert summary["produced"] == summary["indexed"] == LIMIT and summary["index_size"] == LIMIT + 3
    assert summary["malformed_sent"] == summary["dead_lettered"] == 8  # another size or colour is no longer one
    assert summary["learning_rounds"] >= 1 and summary["model_version"] >= 2, summary
    assert summary["precision_at_10"] >= summary["precision_at_10_indexed"], summary
    assert summary["precision_at_10"] > 0.3  # random ranking on 10 classes gives ~0.1


def test_photo_demo_without_cifar10_says_where_to_get_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "streamhash", "demo", "--dataset", "cifar10", "--workdir", str(tmp_path / "demo")],
        env=_env(STREAMHASH_DATA__HOME=str(tmp_path / "empty")), capture_output=True, text=True, timeout=scaled(60))
    assert out.returncode == EXIT_DATASET_MISSING, out.stderr[-2000:]
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "demo").exists()  # nothing started
