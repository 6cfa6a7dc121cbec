"""Offsets and topic ids."""

from streamhash.index.store import Store
from tests.index.store.support import items


def test_offsets_move_backwards_after_a_log_reset_and_topic_ids_are_kept(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3), {("t", 0): 3000})
    s.set_offset("t", 0, 0)
    assert s.offsets() == {("t", 0): 0}
    assert s.topic_ids() == {}
    s.set_topic_id("t", "abc")
    s.set_topic_id("u", "def")
    assert s.topic_ids() == {"t": "abc", "u": "def"}
