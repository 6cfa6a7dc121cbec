"""Items to write in the store's tests."""

import numpy as np

from streamhash.index.store import ItemWrite


def items(n, *, prefix="id", bits=32, seed=0, blob_bytes=100):
    rng = np.random.default_rng(seed)
    return [ItemWrite(f"{prefix}{i}", rng.integers(0, 256, bits // 8, dtype=np.uint8).tobytes(), b"b" * blob_bytes,
                      "image/png", (i % 3,) if i % 4 else None) for i in range(n)]


def codes_of(store, gen: int) -> dict[str, str]:
    """Every code stored in generation ``gen``: item id -> hex."""
    prefix = gen.to_bytes(8, "big")
    with store.env.begin() as txn:
        cur = txn.cursor(db=store.db["codes"])
        found = cur.set_range(prefix)
        out = {}
        while found and cur.key().startswith(prefix):
            out[cur.key()[8:].decode()] = cur.value().hex()
            found = cur.next()
    return out
