"""Every CLI error a newcomer meets is one line on stderr, no traceback, and an exit code of its kind.

Each case runs ``python -m streamhash`` as a subprocess, as a user would; the cases needing an answering
query server start a real ``streamhash serve`` over a store root written here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamhash.errors import EXIT_DATAERR, EXIT_NOINPUT, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_USAGE
from streamhash.kafka.broker import free_port


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "streamhash", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def one_line(out: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    err = out.stderr.strip()
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and len(err.splitlines()) == 1, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in err, err
    return err


def dead_port() -> int:
    return free_port()  # free: nothing listens there


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder as a user has one: a fitting 28x28 gray PNG (labeled 3 by its folder), a 64x64 RGB JPEG photo and a
    file that only claims to be a PNG."""
    folder = tmp_path / "photos"
    (folder / "3").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "3" / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    (folder / "junk.png").write_bytes(b"not a png")
    return folder


def test_query_a_missing_file(tmp_path):
    one_line(run_cli("query", str(tmp_path / "nope.png")), EXIT_NOINPUT, "no such image file", "nope.png")


def test_query_a_folder_instead_of_a_file(tmp_path):
    one_line(run_cli("query", str(tmp_path)), EXIT_NOINPUT, "is a folder, not an image file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_query_an_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(b"x")
    path.chmod(0)
    one_line(run_cli("query", str(path)), EXIT_NOINPUT, "cannot read image file", "Permission denied")


def test_query_with_the_server_down(photos):
    url = f"http://127.0.0.1:{dead_port()}"
    one_line(run_cli("query", str(photos / "3" / "ok.png"), "--url", url), EXIT_UNAVAILABLE,
             f"cannot reach the query server at {url} (connection refused)", "streamhash serve")


def test_query_with_neither_image_nor_code():
    one_line(run_cli("query"), EXIT_USAGE, "give an image path or --code")


def test_produce_a_missing_folder(tmp_path):
    one_line(run_cli("produce", str(tmp_path / "nowhere"), "--check"), EXIT_NOINPUT, "no such folder")


def test_produce_a_folder_without_images(tmp_path):
    one_line(run_cli("produce", str(tmp_path), "--check"), EXIT_NOINPUT, "no PNG, JPEG or .npy files under")


def test_produce_a_missing_npy_batch(tmp_path):
    one_line(run_cli("produce", str(tmp_path / "batch.npy"), "--check"), EXIT_NOINPUT, "no such images file")


def test_produce_with_no_broker_configured(photos):
    one_line(run_cli("produce", str(photos)), EXIT_USAGE, "no broker: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS")


@pytest.mark.parametrize("command", [["produce", "PHOTOS"], ["dlq"], ["dlq", "--replay"], ["delete", "item-1"]])
def test_broker_unreachable(photos, command):
    args = [str(photos) if a == "PHOTOS" else a for a in command]
    one_line(run_cli(*args, env={"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{dead_port()}"}), EXIT_UNAVAILABLE,
             "cannot reach the broker", "Connection refused")


def test_produce_check_names_each_refused_file_and_why_with_a_hint(photos):
    out = run_cli("produce", str(photos), "--check")
    assert out.returncode == EXIT_DATAERR and "Traceback" not in out.stderr
    assert "checked: 1 would be indexed, 2 refused (decode 1, shape 1) would be dead-lettered" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert any(ln.startswith("refused photo.jpg: shape: image has mode RGB") for ln in lines), lines
    assert any(ln.startswith("refused junk.png: decode: ") for ln in lines), lines
    assert any("--resize fill --mode gray" in ln for ln in lines if ln.startswith("hint: ")), lines
    converted = run_cli("produce", str(photos), "--check", "--resize", "fill", "--mode", "gray")
    assert "checked: 2 would be indexed, 1 refused (decode 1)" in converted.stdout, converted.stdout + converted.stderr


@pytest.fixture(scope="module")
def served_root(tmp_path_factory):
    """A real `streamhash serve` over a store root of two shards with eight items (untrained model, version 1)."""
    from streamhash.services.processes import spawn, stop, wait_http
    from tests.services.test_query_server import close_all, make_root

    tmp = tmp_path_factory.mktemp("cli-served")
    stores, _ = make_root(tmp / "index")
    close_all(stores)
    port = free_port()
    proc = spawn(["serve"], env={"STREAMHASH_STORE__PATH": str(tmp / "index"), "STREAMHASH_SERVER__PORT": str(port),
                                 "STREAMHASH_DATA__CLASS_NAMES": "fashion-mnist"}, log_path=tmp / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", 120, proc, tmp / "serve.log")
        yield url
    finally:
        stop(proc)


@pytest.mark.integration
def test_query_an_image_the_server_refuses(served_root, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(path)
    one_line(run_cli("query", str(path), "--url", served_root), EXIT_DATAERR,
             f"the server refused the image {path} (400)", "image is 30x30, expected 28x28")


@pytest.mark.integration
def test_query_a_bad_code(served_root):
    one_line(run_cli("query", "--code", "zz", "--url", served_root), EXIT_DATAERR, "the server refused the code zz (400)")


@pytest.mark.integration
def test_query_with_no_hit_within_the_radius(served_root):
    out = run_cli("query", "--code", "00000000", "--radius", "0", "--url", served_root)
    one_line(out, EXIT_NOT_FOUND, "no item within radius 0")


@pytest.mark.integration
def test_query_says_the_model_is_untrained_and_names_classes(served_root, photos):
    out = run_cli("query", str(photos / "3" / "ok.png"), "-k", "8", "--url", served_root)
    assert out.returncode == 0, out.stderr
    assert "note: the model is untrained (version 1, no learning round yet)" in out.stdout
    assert "STREAMHASH_LEARN__ROUND_EVERY" in out.stdout
    assert "labels=[1]  (Trouser)" in out.stdout and "labels=[0]  (T-shirt/top)" in out.stdout


@pytest.mark.integration
def test_dlq_of_a_topic_nobody_created(broker):
    out = run_cli("dlq", env={"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                              "STREAMHASH_KAFKA__DLQ_TOPIC": "nobody.images.dlq"})
    one_line(out, EXIT_NOT_FOUND, "no topic nobody.images.dlq on the broker", "nothing was dead-lettered there yet")


@pytest.mark.integration
def test_a_worker_started_without_a_broker_says_so(tmp_path):
    """kafka-python tries to bootstrap for its request timeout (30 s), then the worker used to end in a traceback."""
    out = run_cli("worker", "--store", str(tmp_path / "index"), "--metrics-port", "0",
                  env={"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{dead_port()}",
                       "STREAMHASH_KAFKA__REQUEST_TIMEOUT_MS": "5000"})
    assert out.returncode == EXIT_UNAVAILABLE and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("streamhash worker: the broker could not be reached") and "BOOTSTRAP_SERVERS" in last
