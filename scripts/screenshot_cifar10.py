"""README's picture of the search page on CIFAR-10 (``docs/img/search-page-cifar10.png``), after learning.

Runs ``streamhash demo --dataset cifar10 --serve`` (or attaches to a page already up, ``--url``), waits for the
learner's first round to be live (model version > 1), searches by CIFAR-10 *test* photos (never indexed) over the
HTTP API to print how many of each one's top ``k`` share its class, then uploads the chosen one through the page in
headless Debian chromium (Selenium, as ``tests/integration/test_browser.py``) and saves the screenshot.

    STREAMHASH_DATA__CIFAR10_DIR=<folder with cifar10-jpg.tar.gz> \\
        nice -n 10 .venv/bin/python scripts/screenshot_cifar10.py --query cat/0007 [--out docs/img/search-page-cifar10.png]

Without ``--query`` the first test photo with the most hits of its class among the surveyed ones is used. The
photo is uploaded as the file it is (the JPEG of the ``train|test/<class>/NNNN.jpg`` tree or its ``.tar.gz``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_photo(source: Path, name: str) -> bytes:
    """The bytes of ``test/<name>.jpg`` (``name`` = ``<class>/<NNNN>``) in a class-folder tree or its tarball."""
    member = f"test/{name}.jpg"
    if source.is_dir():
        for root in (source, *sorted(p for p in source.iterdir() if p.is_dir())):
            if (root / member).is_file():
                return (root / member).read_bytes()
        raise FileNotFoundError(f"{member} under {source}")
    with tarfile.open(source) as tar:
        for info in tar:
            if info.name.lstrip("./").endswith(member):
                return tar.extractfile(info).read()
    raise FileNotFoundError(f"{member} in {source}")


def start_demo(limit: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    """The demo with ``--serve``; returns it and the page's URL once the summary is printed (its output is
    copied to stderr and to ``workdir``/../``workdir``.log)."""
    cmd = [str(Path(sys.executable).parent / "streamhash"), "demo", "--dataset", "cifar10", "--serve",
           "--limit", str(limit), "--workdir", str(workdir)]
    log = workdir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    found: list[str] = []

    def follow() -> None:
        with log.open("w") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                print(line, end="", file=sys.stderr)
                m = re.search(r"search page: (\S+)", line)
                if m:
                    found.append(m.group(1))

    threading.Thread(target=follow, daemon=True).start()
    deadline = time.monotonic() + 900
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the demo ended or took too long before its page was up (log: {log})")
        time.sleep(1)
    return proc, found[0].rstrip("/")


def wait_learned(base: str, timeout: float = 300) -> dict:
    """/healthz once the learner's model is live (version > 1)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{base}/healthz", timeout=10).raise_for_status().json()
        if health.get("model_version", 1) > 1:
            return health
        if time.monotonic() > deadline:
            raise SystemExit(f"no learned model after {timeout:.0f} s: {health}")
        time.sleep(2)


def survey(base: str, source: Path, names: list[str], k: int) -> list[dict]:
    """Each test photo's top ``k`` by the API: how many share its class, and the hits' classes."""
    rows = []
    for name in names:
        body = {"image_base64": base64.b64encode(test_photo(source, name)).decode(), "k": k}
        got = httpx.post(f"{base}/search", json=body, timeout=60).json()
        cls = name.split("/")[0]
        hit_classes = [(h.get("label_names") or ["?"])[0] for h in got["results"]]
        rows.append({"query": name, "right": sum(c == cls for c in hit_classes), "reranked": got.get("reranked"),
                     "model_version": got["model_version"], "index_size": got["index_size"], "hits": hit_classes})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def screenshot(base: str, photo: bytes, k: int, out: Path) -> None:
    """Upload ``photo`` through the page, wait for ``k`` loaded thumbnails, save the window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "query.jpg"
        path.write_bytes(photo)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp}/profile", "--window-size=1280,1000", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            wait = WebDriverWait(driver, 120, poll_frequency=0.2)
            driver.get(base + "/")
            wait.until(lambda d: d.find_element(By.ID, "live-items").text.isdigit())
            field = driver.find_element(By.ID, "k")
            field.clear()
            field.send_keys(str(k))
            driver.find_element(By.ID, "file").send_keys(str(path))
            driver.find_element(By.ID, "search").click()
            wait.until(lambda d: d.execute_script(
                f"const h = [...document.querySelectorAll('#results li.hit img')];"
                f"return h.length === {k} && h.every(i => i.complete && i.naturalWidth > 0) &&"
                f" document.getElementById('query-image').naturalWidth > 0"))
            # the whole page in the picture: the window grown to the document's height (headless chromium's
            # viewport is the window less a margin, measured here rather than assumed)
            margin = 1000 - driver.execute_script("return window.innerHeight")
            driver.set_window_size(1280, driver.execute_script("return document.documentElement.scrollHeight") + margin)
            time.sleep(3)  # the live panel's next poll (rounds, re-encodes) before the picture
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cifar10", type=Path, default=os.environ.get("STREAMHASH_DATA__CIFAR10_DIR"),
                    help="the train|test/<class>/*.jpg tree, its .tar.gz, or a folder holding cifar10-jpg.tar.gz")
    ap.add_argument("--url", help="a search page already up (no demo started)")
    ap.add_argument("--limit", type=int, default=2000, help="photos the demo streams (its default)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "var" / "screenshot-demo",
                    help="the demo's (wiped at start; not var/demo, where a `streamhash demo` of yours may run)")
    ap.add_argument("--query", help="<class>/<NNNN>: the CIFAR-10 test photo searched by")
    ap.add_argument("--survey", type=int, default=3, help="test photos surveyed per class without --query")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "search-page-cifar10.png")
    args = ap.parse_args()
    if args.cifar10 is None:
        raise SystemExit("say where CIFAR-10 is: --cifar10 or STREAMHASH_DATA__CIFAR10_DIR")
    source = args.cifar10 / "cifar10-jpg.tar.gz" if (args.cifar10 / "cifar10-jpg.tar.gz").exists() else args.cifar10
    demo, base = (None, args.url.rstrip("/")) if args.url else start_demo(args.limit, args.workdir)
    try:
        health = wait_learned(base)
        print(json.dumps({"healthz": health}), flush=True)
        names = [args.query] if args.query else [f"{c}/{i:04d}" for c in CLASSES for i in range(args.survey)]
        rows = survey(base, source, names, args.k)
        best = max(rows, key=lambda r: r["right"])  # the first of the best
        screenshot(base, test_photo(source, best["query"]), args.k, args.out)
        print(json.dumps({"screenshot": str(args.out), **best}), flush=True)
    finally:
        if demo is not None and demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # the demo stops every process it started
            demo.wait(60)


if __name__ == "__main__":
    main()
