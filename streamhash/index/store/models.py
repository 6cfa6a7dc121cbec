"""Serialised hash networks under increasing version numbers; ``meta.model_version`` names the current one."""

from __future__ import annotations

import json

from streamhash.index.store.env import Environment
from streamhash.index.store.layout import from_u64, u64


class Models:
    def __init__(self, env: Environment):
        self.env = env

    def put(self, raw: bytes, *, make_current: bool = False) -> int:
        """Store a serialised model under the next version number."""

        def txn_fn(txn):
            cur = txn.cursor(db=self.env.db["models"])
            version = from_u64(cur.key()) + 1 if cur.last() else 1
            txn.put(u64(version), raw, db=self.env.db["models"])
            if make_current:
                txn.put(b"model_version", json.dumps(version).encode(), db=self.env.db["meta"])
            return version

        return self.env.write(txn_fn)

    def get(self, version: int | None = None) -> tuple[int, bytes | None]:
        def read(txn):
            v = int(self.env.read_meta(txn)["model_version"]) if version is None else version
            return v, txn.get(u64(v), db=self.env.db["models"])

        return self.env.read(read)
