"""The store root: a shard per (topic, partition), the old single-environment layout refused, one
writer per shard across processes (the flock the next owner waits on)."""

import json
import subprocess
import sys

import pytest

from streamhash.errors import StoreError
from streamhash.index.store import Store
from streamhash.index.store.root import LegacyLayoutError, ShardKey, StoreRoot
from streamhash.index.store.shards import OwnedShards


def test_shards_are_listed_in_topic_partition_order_and_only_once_they_hold_data(tmp_path):
    root = StoreRoot(tmp_path)
    for key in (ShardKey("b", 0), ShardKey("a", 10), ShardKey("a", 2)):
        Store(root.shard_path(key), bits=32).close()
    root.shard_path(ShardKey("a", 3)).mkdir(parents=True)  # an empty directory is no shard
    assert root.shards() == [ShardKey("a", 2), ShardKey("a", 10), ShardKey("b", 0)]
    assert str(ShardKey("a", 2)) == "a/2" and root.shard_path(ShardKey("a", 2)) == tmp_path / "shards" / "a" / "2"
    assert json.loads((tmp_path / "streamhash-root.json").read_text())["layout"] == "shard-per-partition"


def test_a_single_environment_store_of_an_older_version_is_refused_with_what_to_do(tmp_path):
    Store(tmp_path, bits=32).close()  # data.mdb directly under the root: the layout before shards
    with pytest.raises(LegacyLayoutError, match="Move it aside"):
        StoreRoot(tmp_path)


def test_topic_names_that_are_not_kafkas_are_refused(tmp_path):
    with pytest.raises(StoreError):
        StoreRoot(tmp_path).shard_path(ShardKey("../etc", 0))


def test_a_shard_held_by_another_process_is_not_opened_until_it_is_released(tmp_path):
    root = StoreRoot(tmp_path)
    key = ShardKey("t", 1)
    path = root.shard_path(key)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from streamhash.index.store import Store
s = Store({str(path)!r}, bits=32)
print("held", flush=True)
sys.stdin.readline()
s.close()
print("released", flush=True)
time.sleep(30)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        shards = OwnedShards(root, lambda p: Store(p, bits=32), images_topic="t", codes_topic="t.codes")
        assert shards.open(key) is None and key not in shards
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        store = shards.open(key)
        assert store is not None and shards.key_of("t.codes", 1) == key  # codes partition 1 lives in shard t/1
        store.set_offset("t.codes", 1, 9)
        assert shards.offsets_of("t.codes", 1) == {("t.codes", 1): 9}
        shards.close_all()
    finally:
        holder.kill()
