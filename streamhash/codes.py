"""Binary code packing: the one place that turns real-valued outputs into stored bytes.

Bit order is big-endian within each byte (``np.packbits`` default): bit ``j`` of a code is
bit ``7 - j % 8`` of byte ``j // 8``. A real value ``>= 0`` maps to bit 1 (sign with
``sign(0) = +1``), so packing is total and deterministic.

>>> import numpy as np
>>> c = pack_signs(np.array([[0.3, -1.0, 0.0, -0.2, 1, 1, 1, 1]]))
>>> c, to_hex(c[0])
(array([[175]], dtype=uint8), 'af')
>>> unpack_signs(c, 8).tolist()
[[1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import numpy as np


def pack_signs(values: np.ndarray) -> np.ndarray:
    """(n, bits) real values -> (n, bits/8) uint8 packed codes, bit = value >= 0."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] % 8:
        raise ValueError(f"expected (n, bits) with bits a multiple of 8, got {values.shape}")
    return np.packbits(values >= 0, axis=1)


def unpack_signs(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, bits/8) uint8 -> (n, bits) float32 in {-1, +1}."""
    b = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=bits)
    return b.astype(np.float32) * 2.0 - 1.0


def to_hex(code: np.ndarray) -> str:
    return np.asarray(code, dtype=np.uint8).tobytes().hex()


def from_hex(text: str, bits: int) -> np.ndarray:
    """Parse a hex code of exactly ``bits`` bits; ValueError with the reason otherwise."""
    text = text.strip().lower().removeprefix("0x")
    if len(text) != bits // 4:
        raise ValueError(f"hex code must have {bits // 4} hex digits for {bits} bits, got {len(text)}")
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"not a hex string: {exc}") from None
    return np.frombuffer(raw, dtype=np.uint8).copy()


def hamming_brute(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distances (nq, n) by unpacking; the reference the fast paths are tested against."""
    q = np.unpackbits(np.asarray(queries, dtype=np.uint8), axis=1).astype(np.int32)
    c = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1).astype(np.int32)
    return (q[:, None, :] != c[None, :, :]).sum(axis=2).astype(np.int32)


def stale(learned, model, version: int) -> np.ndarray:
    """Which stored codes a re-encode to network ``version`` replaces: the inferred ones (network outputs)
    made by another version, or by none recorded (-1). Learned codes (DCC, fitted to labels) never are: a
    re-encode would undo what the labels taught. Shared by the store's generation builder and the eval
    harness, so both re-encode the same codes.

    >>> stale([True, False, False, False], [3, 3, 2, -1], 3).tolist()
    [False, False, True, True]
    """
    return ~np.asarray(learned, bool) & (np.asarray(model, np.int64) != int(version))

