"""Who gets in, on real processes (issue 26): two ``streamhash serve`` over one store root, one with an API key
and tight client bounds, one over HTTPS (a self-signed certificate made here by ``openssl``) with the same
key, and a router over the HTTPS one that forwards its key. Without the key: 401 with a JSON error, health and
metrics open; `"k": true` is a 400, not k=1; a client trickling its headers is cut off and cannot keep real
clients out; plain HTTP to the HTTPS port gets nothing; the key is never logged."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from streamhash.kafka.broker import free_port
from streamhash.services.processes import spawn
from tests.support import stop
from tests.services.test_query_server import close_all, make_root

pytestmark = pytest.mark.integration

KEY = "s3cret-key-for-tests"
AUTH = {"authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 20


def make_cert(tmp) -> tuple:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def wait_up(urls: list[str], proc, log, verify=True, timeout: float = 120) -> None:
    """Until one of ``urls`` gives any HTTP answer (so that, on code without the feature, each test fails on its
    own assertion rather than the fixture on its wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        for url in urls:
            try:
                httpx.get(url, timeout=1.0, verify=verify)
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise TimeoutError(urls)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    stores, _ = make_root(tmp / "root")
    close_all(stores)
    cert, keyfile = make_cert(tmp)
    ports = {name: free_port() for name in ("keyed", "tls", "router")}
    keyed_env = {"STREAMHASH_SECURITY__API_KEY": KEY, "STREAMHASH_SERVER__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
                 "STREAMHASH_SERVER__MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    tls_env = {"STREAMHASH_SECURITY__API_KEY": KEY, "STREAMHASH_SERVER__SSL_CERTFILE": str(cert),
               "STREAMHASH_SERVER__SSL_KEYFILE": str(keyfile)}
    router_env = {"STREAMHASH_SECURITY__API_KEY": KEY, "STREAMHASH_SERVER__SHARD_CAFILE": str(cert)}
    logs = {name: tmp / f"{name}.log" for name in ports}
    procs = {}
    try:
        for name, env in (("keyed", keyed_env), ("tls", tls_env)):
            procs[name] = spawn(["serve", "--store", str(tmp / "root"), "--port", str(ports[name])], env=env,
                                log_path=logs[name])
        procs["router"] = spawn(["serve", "--shards", f"https://127.0.0.1:{ports['tls']}", "--shard-timeout-s", "5",
                                 "--port", str(ports["router"])], env=router_env, log_path=logs["router"])
        urls = {"keyed": f"http://127.0.0.1:{ports['keyed']}", "tls": f"https://127.0.0.1:{ports['tls']}",
                "router": f"http://127.0.0.1:{ports['router']}"}
        ca = ssl.create_default_context(cafile=str(cert))
        wait_up([urls["keyed"] + "/healthz"], procs["keyed"], logs["keyed"])
        wait_up([urls["tls"] + "/healthz", urls["tls"].replace("https:", "http:") + "/healthz"], procs["tls"], logs["tls"],
                verify=ca)
        wait_up([urls["router"] + "/healthz"], procs["router"], logs["router"])
        yield {"urls": urls, "ports": ports, "ca": ca, "logs": logs, "procs": procs}
    finally:
        for proc in procs.values():
            stop(proc)


def search(url: str, body: dict, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{url}/search", json=body, headers=headers, timeout=30, **kw)


CODE = {"code_hex": "0f3a9c21"}


# --- API key -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["keyed", "router"])
def test_without_the_key_401_with_a_json_error(system, where):
    url = system["urls"][where]
    r = search(url, {**CODE, "k": 3}, headers={})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    wrong = search(url, {**CODE, "k": 3}, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
    for path in ("/items/item-1", "/docs", "/openapi.json"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
    ok = search(url, {**CODE, "k": 3})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 3


def test_health_metrics_and_the_page_shell_are_open(system):
    url = system["urls"]["keyed"]
    for path in ("/healthz", "/metrics", "/", "/ui/app.js"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    assert httpx.get(url + "/status", timeout=10).status_code == 401  # data: behind the key
    assert httpx.get(url + "/random", timeout=10).status_code == 401


def test_the_page_key_cookie_opens_thumbnails_and_searches(system):
    url = system["urls"]["keyed"]
    cookies = {"streamhash_api_key": KEY}
    assert httpx.get(url + "/items/item-1/image?size=32", cookies=cookies, timeout=10).status_code == 200
    assert httpx.get(url + "/items/item-1/image?size=32", cookies={"streamhash_api_key": "x"}, timeout=10).status_code == 401
    r = httpx.post(url + "/search", json={"item_id": "item-1", "k": 2}, cookies=cookies, timeout=10)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "item-1"


def test_the_router_forwards_its_key_over_tls(system):
    r = search(system["urls"]["router"], {"item_id": "item-2", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["partial"] is False and body["results"][0]["id"] == "item-2"
    assert all(s["url"].startswith("https://") for s in body["shards"])


def test_the_key_is_never_logged(system):
    for name, log in system["logs"].items():
        text = log.read_text()
        assert KEY not in text, name
    assert "**********" in system["logs"]["keyed"].read_text() or "starting with settings" not in system["logs"]["keyed"].read_text()


# --- strict JSON types ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["keyed", "router"])
@pytest.mark.parametrize("fields", [{"k": True}, {"k": False}, {"k": 2.0}, {"k": "2"}, {"k": 1, "radius": True},
                                    {"k": 1, "radius": 3.0}, {"k": None}, {"k": [1]}])
def test_json_numbers_must_be_integers(system, where, fields):
    r = search(system["urls"][where], {**CODE, **fields})
    assert r.status_code == 400, (fields, r.status_code, r.text)
    assert "bad search request" in r.json()["detail"]


@pytest.mark.parametrize("k,radius", [("true", None), ("2.0", None), ("", None), ("2", "x"), ("-1", None)])
def test_multipart_numbers_must_be_whole_numbers(system, k, radius):
    from streamhash.records import encode_png
    import numpy as np

    png = encode_png(np.zeros((28, 28), np.uint8))
    data = {"k": k, **({"radius": radius} if radius is not None else {})}
    r = httpx.post(system["urls"]["keyed"] + "/search", files={"image": ("q.png", png, "image/png")}, data=data,
                   headers=AUTH, timeout=30)
    assert r.status_code == 400, (k, radius, r.text)
    ok = httpx.post(system["urls"]["keyed"] + "/search", files={"image": ("q.png", png, "image/png")},
                    data={"k": "2", "radius": "33"}, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


# --- TLS ------------------------------------------------------------------------------------------------


def test_https_answers_and_plain_http_gets_nothing(system):
    url = system["urls"]["tls"]
    r = search(url, {**CODE, "k": 2}, verify=system["ca"])
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    with pytest.raises(httpx.HTTPError):  # an unverified certificate is refused by the client
        httpx.get(url + "/healthz", timeout=5)
    plain = url.replace("https://", "http://")
    try:
        status = httpx.get(plain + "/healthz", timeout=5).status_code
    except httpx.HTTPError:
        status = None
    assert status is None, "a plain-HTTP request was answered on the HTTPS port"


# --- client bounds --------------------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def test_a_client_trickling_its_headers_is_cut_off(system):
    s = _connect(system["ports"]["keyed"])
    t0 = time.monotonic()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(50):  # a header byte every 0.1 s: never complete
        try:
            s.sendall(b"X")
        except OSError:
            break
        time.sleep(0.1)
    reply = _read_all(s)
    took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT_S + 3, (reply[:80], took)
    silent = _connect(system["ports"]["keyed"])
    t0 = time.monotonic()
    assert _read_all(silent) == b"" and time.monotonic() - t0 < HEADER_TIMEOUT_S + 3  # closed, not held


def test_endless_headers_are_refused(system):
    s = _connect(system["ports"]["keyed"])
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
    assert _read_all(s).startswith(b"HTTP/1.1 431")


def test_idle_connections_past_the_cap_cannot_keep_clients_out(system):
    port = system["ports"]["keyed"]
    held = [_connect(port) for _ in range(MAX_CONNECTIONS * 3)]  # each sent half a request line, then nothing
    for s in held:
        s.sendall(b"GET /heal")
    time.sleep(0.2)
    t0 = time.monotonic()
    r = search(system["urls"]["keyed"], {**CODE, "k": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < HEADER_TIMEOUT_S / 2
    open_after = 0
    for s in held:
        s.setblocking(False)
        try:
            open_after += 0 if s.recv(1) == b"" else 1  # b"": closed by the server
        except BlockingIOError:
            open_after += 1  # still open: nothing to read
        except OSError:
            pass
        s.close()
    assert open_after <= MAX_CONNECTIONS
    metrics = httpx.get(system["urls"]["keyed"] + "/metrics", timeout=10).text
    assert 'streamhash_http_connections_closed_total{reason="evicted_idle"}' in metrics
