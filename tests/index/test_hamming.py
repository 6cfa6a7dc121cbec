"""Every registered Hamming backend against brute force (streamhash.codes.hamming_brute) and a reference model:
the check suite of backend_checks, run against each; then what is not per backend."""

from __future__ import annotations

import numpy as np
import pytest

from streamhash.index import hamming
from streamhash.index.backends import backend_names, make_index
from tests.index.backend_checks import Model, check_id, compare, factory_for, limit_to, rand_codes, yield_checks

torch = pytest.importorskip("torch")
HAVE_CUDA = torch.cuda.is_available()

# every backend registered when this module is collected, the torch one on the CPU as well, and the
# native backend held to each narrower scan than the one this CPU picks (native:popcnt, native:generic)
BACKENDS = [name for name in backend_names() if name != "auto"] + ["torch-cpu", "native:popcnt", "native:generic"]


@pytest.fixture(params=BACKENDS)
def factory(request):
    name, _, kernel = request.param.partition(":")
    if kernel:
        limit_to(request, kernel)
    return factory_for(name)


@pytest.mark.parametrize("check", list(yield_checks()), ids=check_id)
def test_backend(factory, check):
    check(factory)


def test_validation():
    with pytest.raises(ValueError):
        make_index(12)
    with pytest.raises(ValueError):
        make_index(64, backend="faiss")
    index = make_index(64, "numpy")
    with pytest.raises(ValueError):
        index.add_with_ids(np.zeros((2, 4), np.uint8), np.arange(2))
    with pytest.raises(ValueError):
        index.add_with_ids(np.zeros((2, 8), np.uint8), np.arange(3))
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 8), np.int64), 1)


def test_auto_backend():
    want = "native" if hamming.native_available() else "numpy"
    assert make_index(64).backend == want


@pytest.mark.skipif(not hamming.native_available(), reason="the native kernel is not built here")
def test_a_kernel_limit_that_names_no_scan_is_refused_and_changes_nothing():
    before = make_index(64, "native").kernel
    for bad in ("sse", "", "AVX512"):
        with pytest.raises(ValueError, match="kernel must be one of"):
            hamming.limit_kernel(bad)
    with pytest.raises(ValueError, match="kernel level must be"):
        hamming._native.limit_kernel(3)
    assert make_index(64, "native").kernel == before
    assert hamming.limit_kernel("avx512") == "avx512"  # the limit was never moved


@pytest.mark.skipif(HAVE_CUDA, reason="checks the error raised without CUDA")
def test_torch_backend_without_cuda_raises():
    with pytest.raises(RuntimeError, match="CUDA"):
        make_index(64, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs CUDA")
def test_torch_cuda_matches_brute():
    rng = np.random.default_rng(11)
    index, model = make_index(72, backend="torch"), Model()
    codes, ids = rand_codes(rng, 5000, 72, density=0.2), rng.permutation(10**6)[:5000]
    index.add_with_ids(codes, ids)
    model.add(codes, ids)
    index.remove_ids(ids[::3])
    model.remove(ids[::3])
    compare(index, model, rand_codes(rng, 9, 72, density=0.2), ks=(1, 10, 4000), radii=(3, 9))
