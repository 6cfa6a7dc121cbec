"""Property: the query server answers any request with 200 or a 4xx, never a 5xx.

In-process over a real LMDB store with a model and a few items. Example count: STREAMHASH_FUZZ_EXAMPLES.
"""

import pytest
from hypothesis import given
from tests.services.test_query_server import serving

from tests.fuzz.strategies import FUZZ, requests
from tests.fuzz.targets import http_status

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("fuzz-store")) as (client, _):
        yield client


@FUZZ
@given(requests())
def test_any_request_is_answered_200_or_4xx(client, req):
    status = http_status(client, req)
    assert status == 200 or 400 <= status < 500, f"{req} -> {status}"
