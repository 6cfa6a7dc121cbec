"""The index: the LMDB store (source of truth) and the in-memory Hamming search built from it."""
