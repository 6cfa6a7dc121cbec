import numpy as np
import pytest

from streamhash.codes import from_hex, hamming_brute, pack_signs, to_hex, unpack_signs


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 48, 64, 72, 128, 256])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    signs = rng.choice([-1.0, 1.0], size=(50, bits)).astype(np.float32)
    codes = pack_signs(signs)
    assert codes.shape == (50, bits // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(unpack_signs(codes, bits), signs)
    for c in codes[:5]:
        np.testing.assert_array_equal(from_hex(to_hex(c), bits), c)


def test_zero_maps_to_plus_one_and_bit_order_is_big_endian():
    v = np.full((1, 8), -1.0)
    v[0, 0] = 0.0
    assert pack_signs(v)[0, 0] == 0b1000_0000


def test_hamming_brute_counts_differing_signs():
    rng = np.random.default_rng(1)
    a, b = rng.choice([-1, 1], (4, 24)), rng.choice([-1, 1], (6, 24))
    expected = (a[:, None, :] != b[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_brute(pack_signs(a), pack_signs(b)), expected)


@pytest.mark.parametrize("text", ["abc", "zz" * 4, "00" * 5])
def test_from_hex_rejects_wrong_width_or_digits(text):
    with pytest.raises(ValueError):
        from_hex(text, 32)
