"""The schema: a reopened store keeps its data and refuses other settings or another schema."""

import subprocess
import sys
import textwrap

import pytest

from streamhash.errors import SchemaMismatchError
from streamhash.index.store import Store
from tests.index.store.support import items


def test_reopen_checks_bits_and_keeps_data(tmp_path):
    Store(tmp_path, bits=32).write_batch(items(3), {("t", 0): 3})
    # a second process may not reopen an env this process has open: use a subprocess for the checks
    code = textwrap.dedent(f"""
        from streamhash.index.store import Store
        from streamhash.errors import SchemaMismatchError
        try:
            Store({str(tmp_path)!r}, bits=64)
        except SchemaMismatchError as e:
            print("mismatch:", e)
        s = Store({str(tmp_path)!r}, readonly=True)
        print(s.count(), s.bits, s.offsets())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mismatch: store" in out and "holds 32-bit codes" in out
    assert "3 32 {('t', 0): 3}" in out


def test_schema_mismatch_is_typed(tmp_path):
    s = Store(tmp_path, bits=32)
    s._write(lambda txn: s._put_meta(txn, {"schema_version": 999}))
    s.close()
    with pytest.raises(SchemaMismatchError, match="schema 999"):
        Store(tmp_path, bits=32)
