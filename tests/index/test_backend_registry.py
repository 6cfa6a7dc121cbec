"""A new Hamming backend is one file (brute_backend.py) and the one registration line below: make_index, the
settings, the CLI and the radius cost model all take it, and it passes the suite every backend passes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamhash.cli import build_parser
from streamhash.config import ServerSettings
from streamhash.errors import ConfigError
from streamhash.index import backends
from streamhash.index.backends import backend_names, check_backend, make_index
from streamhash.index.sharded import ShardedIndex
from streamhash.index.store.root import StoreRoot
from streamhash.index.multihash import choose_radius_strategy
from tests.index.backend_checks import check_id, factory_for, yield_checks

backends.register("brute", "tests.index.brute_backend:BruteIndex", scan_ns_per_row=500.0)


@pytest.mark.parametrize("check", list(yield_checks()), ids=check_id)
def test_the_registered_backend_passes_the_suite(check):
    check(factory_for("brute"))


def test_everything_that_names_backends_reads_the_registry():
    assert "brute" in backend_names() and make_index(16, "brute").backend == "brute"
    assert ServerSettings(backend="brute").backend == "brute"
    assert check_backend("brute") == "brute" and check_backend("auto") == "auto"
    with pytest.raises(ConfigError, match="backend must be one of"):
        check_backend("faiss")
    serve = build_parser().parse_args(["serve", "--backend", "brute"])
    assert getattr(serve, "server.backend") == "brute"
    # a scan this slow leaves the flat path to small indexes: the tables win where numpy's scan still would not
    n, bits, m = 5_000, 64, 4
    assert choose_radius_strategy(n, bits, m, 3, backend="numpy") == "scan"
    assert choose_radius_strategy(n, bits, m, 3, backend="brute") == "tables"


def test_the_query_servers_index_refuses_an_unknown_backend_before_any_shard_exists(tmp_path):
    """The settings take any name (the backends are the index's to know, and a plugin registers after they load):
    the sharded index checks it when made, so a typo fails the server's start, not the first shard's arrival."""
    assert ServerSettings(backend="faiss").backend == "faiss"
    with pytest.raises(ConfigError, match="server.backend must be one of"):
        ShardedIndex(StoreRoot(tmp_path), backend="faiss")
    ShardedIndex(StoreRoot(tmp_path), backend="brute").close()


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        backends.register("numpy", "tests.index.brute_backend:BruteIndex")
    with pytest.raises(ValueError, match="'auto' is the choice"):
        backends.register("auto", "tests.index.brute_backend:BruteIndex")
    backends.register("brute", "tests.index.brute_backend:BruteIndex", scan_ns_per_row=500.0)  # the same line again


def test_no_backend_is_imported_before_an_index_is_made():
    """Naming backends (settings, CLI) loads neither numpy nor torch; hamming and torch_backend do not import each other."""
    code = ("import sys; import streamhash.config, streamhash.cli; "
            "assert not {'numpy', 'torch', 'streamhash.index.hamming'} & set(sys.modules), sorted(sys.modules); "
            "import streamhash.index.hamming; assert 'streamhash.index.torch_backend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
