"""Serialised hash networks under increasing version numbers; ``meta.model_version`` names the current one."""

from __future__ import annotations

import json

from streamhash.index.store.env import Environment
from streamhash.index.store.layout import from_u64, u64


class Models:
    def __init__(self, env: Environment):
        self.env = env

    def put(self, raw: bytes, *, make_current: bool = False, version: int | None = None) -> int:
        """Store a serialised model under ``version`` (the learner's number, from the models topic) or, without
        one, under the next version number of this store."""

        def txn_fn(txn):
            cur = txn.cursor(db=self.env.db["models"])
            v = version if version is not None else from_u64(cur.key()) + 1 if cur.last() else 1
            txn.put(u64(v), raw, db=self.env.db["models"])
            if make_current:
                txn.put(b"model_version", json.dumps(v).encode(), db=self.env.db["meta"])
            return v

        return self.env.write(txn_fn)

    def get(self, version: int | None = None) -> tuple[int, bytes | None]:
        def read(txn):
            v = int(self.env.read_meta(txn)["model_version"]) if version is None else version
            return v, txn.get(u64(v), db=self.env.db["models"])

        return self.env.read(read)
