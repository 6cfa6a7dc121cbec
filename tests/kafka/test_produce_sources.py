"""Where the producer's messages come from: arrays (a .npy batch, a dataset the CLI loads from ``data/``) keyed by
their index, so the same image always has the same id, in whatever order they are sent."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from streamhash.config import Settings
from streamhash.kafka.produce import from_arrays
from streamhash.records import ImageSpec, parse_message
from tests.support import have_fashion_mnist


def test_arrays_sent_in_another_order_keep_the_id_of_their_index():
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    sent = list(from_arrays(images, [5, 6, 7, 8], prefix="p-", fmt="npy", order=np.array([2, 0, 3])))
    assert [(m.key, m.labels) for m in sent] == [("p-2", 7), ("p-0", 5), ("p-3", 8)]
    for m, i in zip(sent, [2, 0, 3]):
        assert (parse_message(m.key.encode(), m.value, [], ImageSpec(28, 28, 1)).image == images[i]).all()
    assert [m.key for m in from_arrays(images[:2], None, prefix="q-", start=10)] == ["q-10", "q-11"]


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
def test_the_named_dataset_is_sent_under_its_index_ids_shuffled_or_not():
    """`streamhash produce --dataset fashion-mnist`: the CLI loads it from data/ and sends it as arrays, ids
    ``fmnist-<index>`` whatever the shuffle, labels its classes."""
    from streamhash.cli.produce import _messages
    from streamhash.data.fashion_mnist import load_all

    images, labels = load_all()
    args = argparse.Namespace(dataset="fashion-mnist", source=None, labels=None, id_prefix=None)
    for seed in (None, 7):
        messages, total = _messages(args, Settings(produce={"shuffle_seed": seed, "format": "npy"}))
        order = np.arange(total) if seed is None else np.random.default_rng(seed).permutation(total)
        assert total == len(images) == 70_000
        for m, i in zip([next(messages) for _ in range(3)], order[:3].tolist()):
            assert m.key == f"fmnist-{i}" and m.labels == int(labels[i])
            assert (parse_message(m.key.encode(), m.value, [], ImageSpec(28, 28, 1)).image == images[i]).all()
