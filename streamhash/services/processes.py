"""Starting, watching and stopping streamhash processes: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from streamhash.lifetime import die_with_parent


def spawn(args: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """``python -m streamhash ARGS`` in its own process group, output to ``log_path``. ``cwd``: another
    checkout, whose ``streamhash`` package the process then imports (``-m`` puts the directory first).

    Started from the main thread, the process is killed by the kernel when this one ends, however it ends
    (:func:`~streamhash.lifetime.die_with_parent`): a demo closed with its terminal, a test run killed on a
    timeout, leave nothing running. Every streamhash process is safe to kill -9 (the shards and offsets
    commit together); stop it with :func:`stop` for a clean end."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "streamhash", *args], env={**os.environ, **env}, cwd=cwd,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGKILL))


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, wait, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Call ``predicate`` until it returns something truthy, and return that; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def total(samples: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label values in a :func:`scrape` result."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


class ScrapeFailed(RuntimeError):
    """A /metrics page that did not answer within the scrape's deadline, however often it was asked."""


def scrape(url: str, *, deadline_s: float = 0.0, timeout_s: float = 5.0) -> dict[str, float]:
    """A /metrics page as ``{'name{label="v"}': value}`` (labels sorted), for checks and summaries.

    A busy process (a learner in a round, on a loaded machine) can take longer than ``timeout_s`` to
    answer once. ``deadline_s`` > 0: the scrape is asked again, with a back-off, until then, and
    :class:`ScrapeFailed` says which page and for how long; 0: one try, its httpx error raised as it is."""
    deadline, pause = time.monotonic() + deadline_s, 0.2
    while True:
        try:
            text = httpx.get(url, timeout=timeout_s).raise_for_status().text
            break
        except httpx.HTTPError as exc:
            if not deadline_s:
                raise
            if time.monotonic() + pause > deadline:
                raise ScrapeFailed(f"{url} did not answer within {deadline_s:.0f}s ({type(exc).__name__}: {exc})") from None
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
