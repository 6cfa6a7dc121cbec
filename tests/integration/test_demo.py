"""`streamhash demo --json` end to end (needs Fashion-MNIST; `make data` provides it)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamhash.data.fashion_mnist import find_dir
from streamhash.errors import DatasetMissingError
from streamhash.lifetime import die_with_parent
from tests.support import scaled

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
        capture_output=True, text=True, timeout=scaled(240), preexec_fn=die_with_parent(signal.SIGTERM),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["produced"] == 1500 and summary["indexed"] == 1500
    assert summary["malformed_sent"] == summary["dead_lettered"] == 8
    for key in ("ingest_images_per_s", "freshness_p99_s", "query_p50_ms", "query_p99_ms", "precision_at_10"):
        assert summary[key] > 0, key
    assert summary["freshness_probes"] == 10 and summary["queries"] == 40
    assert summary["precision_at_10"] > 0.2  # random ranking on 10 classes gives ~0.1


def started_in_the_background():
    """A ``preexec_fn``: the child dies with the test (SIGTERM) and starts with SIGINT ignored, as a shell's
    background job inherits it."""
    die = die_with_parent(signal.SIGTERM)

    def preexec() -> None:
        if die is not None:
            die()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return preexec


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (make data)")
def test_demo_serve_stays_up_until_ctrl_c_then_stops_everything(tmp_path):
    """Every URL the demo printed used to be dead by the time a user read it. The demo starts as a background job
    of a script does (`cmd &`), with SIGINT ignored: Ctrl-C's signal used to do nothing then (CI ran it so)."""
    import os
    import re
    import signal
    import time

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "streamhash", "demo", "--serve", "--limit", "600", "--queries", "10", "--probes", "3",
         "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=started_in_the_background())
    page, lines, deadline = None, [], time.monotonic() + scaled(240)
    while page is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        m = re.search(r"search page: (http://\S+)", line)
        page = m.group(1) if m else None
    assert page, "".join(lines)[-3000:]
    time.sleep(2)  # time passing is the point: the demo once exited right after printing its URLs
    assert httpx.get(page + "healthz").json()["index_size"] >= 600
    locks = sorted((tmp_path / "demo" / "index" / "shards").glob("*/*/writer.lock"))
    worker_pid = int(locks[0].read_text().split()[1])  # the one worker holds every shard
    learner_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_learner(p, tmp_path)]
    assert len(locks) == 4 and len(learner_pids) == 1
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    assert proc.wait(timeout=scaled(60)) == 0
    try:
        httpx.get(page + "healthz", timeout=1)
        raise AssertionError("the query server is still up")
    except httpx.HTTPError:
        pass
    assert not os.path.exists(f"/proc/{worker_pid}") and not os.path.exists(f"/proc/{learner_pids[0]}")


def _is_learner(proc_dir, tmp_path) -> bool:
    """A `streamhash learner` process of this demo (its command line and its environment's store root)."""
    try:
        cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
        env = (proc_dir / "environ").read_bytes()
    except OSError:
        return False
    return b"learner" in cmd and str(tmp_path / "demo").encode() in env


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (make data)")
def test_demo_talks_while_it_waits_and_names_no_url_it_stopped(tmp_path):
    """`make demo` used to go silent for minutes, then print metrics and search URLs already dead."""
    import re

    out = subprocess.run(
        [sys.executable, "-m", "streamhash", "demo", "--limit", "600", "--queries", "10", "--probes", "3",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=scaled(300), preexec_fn=die_with_parent(signal.SIGTERM),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stamps = [int(m.group(1)) for m in re.finditer(r"^\[\s*(\d+) s\] ", out.stdout, re.MULTILINE)]
    assert len(stamps) >= 4 and stamps[0] <= 5, out.stdout
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 5, out.stdout  # a line at least every 5 s
    assert "learning: " in out.stdout
    summary = out.stdout[out.stdout.index("streamhash demo:"):]
    assert "http://" not in summary and "run `streamhash demo --serve` to keep them" in summary
    assert re.search(r"the query index holds 603: 600 images \+ 3 freshness probes", summary), summary
