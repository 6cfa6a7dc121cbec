"""The connection cap fits the open-file limit: past it accept() fails and every new connection, a real client's
too, is dropped unanswered (bench_slow_clients.py at a soft limit of 1024: 0 of 49 searches answered on the
code before the bounds). Each case in a process of its own: a lowered hard limit cannot be raised again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from streamhash.services.bounds import fit_open_files
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
print("cap", fit_open_files({cap}), "soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def probe(soft: int, hard: int, cap: int) -> str:
    return subprocess.run([sys.executable, "-c", PROBE.format(soft=soft, hard=hard, cap=cap)], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("soft,hard,cap,expect", [
    (1024, 4096, 1000, "cap 1000 soft 1256"),  # the soft limit raised: room for the cap and the rest
    (1024, 1024, 1000, "cap 768 soft 1024"),  # no room to raise: the cap lowered, said in a warning
    (4096, 4096, 1000, "cap 1000 soft 4096"),  # enough already: untouched
])
def test_the_cap_fits_the_open_file_limit(soft, hard, cap, expect):
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] not in (resource.RLIM_INFINITY,) and \
            resource.getrlimit(resource.RLIMIT_NOFILE)[1] < hard:
        pytest.skip("this machine's hard open-file limit is lower")
    out = probe(soft, hard, cap)
    assert expect in out
    assert ("lowered to 768" in out) == (expect == "cap 768 soft 1024")
