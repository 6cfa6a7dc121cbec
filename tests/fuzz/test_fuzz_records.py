"""Property: every Kafka record, however malformed, becomes an ImageRecord of the spec's shape or a RecordRejected.

Example count: STREAMHASH_FUZZ_EXAMPLES (200 by default; benchmarks/bench_fuzz.py runs 100,000 inputs).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, headers, image_values, keys, messages, mutated, valid_images
from tests.fuzz.targets import decode_outcome, parse_outcome

# Mutated sizes between PIL's two ceilings warn before our limit rejects them; the warning is not the point here.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@FUZZ
@given(messages())
def test_any_record_is_parsed_or_rejected(message):
    parse_outcome(*message)


@FUZZ
@given(keys, st.binary(max_size=4096), headers)
def test_random_bytes_are_rejected_not_raised(key, value, hdrs):
    parse_outcome(key, value, hdrs)


@FUZZ
@given(valid_images().flatmap(lambda typed: st.tuples(st.just(typed[0]), mutated(typed[1]))))
def test_mutated_images_reach_their_decoder_and_are_decoded_or_rejected(typed):
    content_type, value = typed
    decode_outcome(value, content_type)


@FUZZ
@given(image_values(), st.sampled_from(["image/png", "image/jpeg", "application/x-npy"]))
def test_decoding_with_any_declared_type_is_decoded_or_rejected(value, content_type):
    decode_outcome(value, content_type)
