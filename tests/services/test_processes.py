"""The process helpers the demo, the tests and the benchmarks share: a metrics scrape that outlasts one slow
answer, and gives up in one line; a child that dies with its parent.

`streamhash demo --serve` once died with a 90-line httpx.ReadTimeout because one scrape of a busy learner
took over 5 s.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamhash.services import demo
from streamhash.services.processes import ScrapeFailed, scrape


class _Slow(BaseHTTPRequestHandler):
    delays: list[float] = []  # seconds before each answer, in order; then at once

    def do_GET(self):
        if self.delays:
            time.sleep(self.delays.pop(0))
        body = b"# TYPE streamhash_learning_rounds_total counter\nstreamhash_learning_rounds_total 3.0\n"
        try:
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up on this one
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_metrics():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics", _Slow.delays
    server.shutdown()
    server.server_close()
    _Slow.delays.clear()


def test_a_scrape_slower_than_its_timeout_once_is_asked_again(slow_metrics):
    url, delays = slow_metrics
    delays[:] = [3.0]  # the first answer comes after the client's timeout
    t0 = time.monotonic()
    assert scrape(url, deadline_s=20, timeout_s=1)["streamhash_learning_rounds_total"] == 3.0
    assert 1 <= time.monotonic() - t0 < 10


def test_a_scrape_that_never_answers_gives_up_at_its_deadline_in_one_line(slow_metrics):
    url, delays = slow_metrics
    delays[:] = [30.0] * 20
    t0 = time.monotonic()
    with pytest.raises(ScrapeFailed) as err:
        scrape(url, deadline_s=3, timeout_s=0.5)
    assert time.monotonic() - t0 < 6
    assert url in str(err.value) and "\n" not in str(err.value)


def test_the_demo_scrapes_with_a_deadline_and_ends_with_one_line_when_it_passes(tmp_path):
    """demo.run: a scrape that gives up ends the demo with exit 69 and one line, no traceback (every process
    it started stopped by run_demo's own clean-up)."""
    assert demo.SCRAPE_DEADLINE_S >= 30
    code = textwrap.dedent(f"""
        import sys
        from streamhash.config import Settings
        from streamhash.services import demo
        from streamhash.services.processes import ScrapeFailed

        def run_demo(*a, **kw):
            raise ScrapeFailed("http://127.0.0.1:1/metrics did not answer within 60s (ReadTimeout: timed out)")

        demo.run_demo = run_demo
        sys.exit(demo.run(Settings(demo={{"workdir": {str(tmp_path / 'demo')!r}}})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 69, out.stderr
    assert len(lines) == 1 and "did not answer within 60s" in lines[0], out.stderr
