"""``streamhash produce --dataset cifar10 | folder``: photos sent as they are on disk, each labelled with its class
and named (label-names), under ids that do not depend on the form CIFAR-10 came in; what a worker would take."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from streamhash.cli.common import CommandFailed
from streamhash.config import Settings
from streamhash.data import cifar10
from streamhash.errors import DatasetMissingError
from streamhash.kafka.produce import check
from streamhash.records import ImageSpec, parse_message
from streamhash.imaging import Conversion
from tests.data.test_cifar10 import TARBALL, _official_release

PHOTO_SPEC = ImageSpec(32, 32, 3, conversion=Conversion(mode="rgb", resize="fill"))


def messages(**kw):
    from streamhash.cli.produce import _messages

    args = dict(dataset="cifar10", source=None, labels=None, id_prefix=None, path=None, split=None, per_class=None)
    args.update(kw)
    seed = args.pop("seed", None)
    got, total = _messages(argparse.Namespace(**args), Settings(produce={"shuffle_seed": seed}))
    return list(got), total


def parsed(msg):
    from streamhash.records import message_headers

    return parse_message(msg.key.encode(), msg.value, message_headers(msg.labels, msg.content_type, msg.label_names),
                         PHOTO_SPEC)


@pytest.mark.skipif(not TARBALL.exists(), reason=f"the shared CIFAR-10 tarball is not at {TARBALL}")
def test_cifar10_jpegs_are_sent_as_they_are_with_their_class_names():
    sent, _ = messages(path=str(TARBALL), per_class=20)  # 20 per class of each split: 400 images
    assert len(sent) == 400 and len({m.key for m in sent}) == 400
    first = sent[0]
    assert first.key == "cifar10-train-airplane-0000" and first.content_type == "image/jpeg"
    assert first.value[:3] == b"\xff\xd8\xff"  # the file's own bytes, not a re-encode
    for m in sent:
        split, name = m.key.split("-")[1:3]
        assert split in ("train", "test") and m.label_names == name == cifar10.CLASSES[m.labels]
        assert check(m, PHOTO_SPEC) is None
    assert sum(m.key.startswith("cifar10-test-") for m in sent) == 200
    rec = parsed(sent[-1])
    assert rec.label_names == ((9, "truck"),) and rec.image.shape == (32, 32, 3)
    shuffled, _ = messages(path=str(TARBALL), per_class=5, split="test", seed=3)
    assert len(shuffled) == 50 and [m.labels for m in shuffled] != sorted(m.labels for m in shuffled)


def test_the_official_release_is_sent_as_pngs_under_the_same_ids(tmp_path):
    batches = _official_release(tmp_path / cifar10.BATCHES_DIR)
    sent, _ = messages(path=str(tmp_path), split="test")
    images, labels = batches["test_batch"]
    assert [m.labels for m in sent] == labels and all(m.content_type == "image/png" for m in sent)
    for m, image, label in zip(sent, images, labels):
        assert m.key == f"cifar10-test-{cifar10.CLASSES[label]}-0000" and m.label_names == cifar10.CLASSES[label]
        np.testing.assert_array_equal(parsed(m).image, image)
    train, _ = messages(path=str(tmp_path), split="train", per_class=1)
    assert sorted(m.labels for m in train) == list(range(8))


def test_without_cifar10_the_user_is_told_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMHASH_DATA__CIFAR10_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetMissingError, match="cifar-10-python.tar.gz"):
        messages(path=str(tmp_path / "nowhere"))


def _save(path, colour, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, format=fmt)


def test_your_own_class_folders(tmp_path):
    _save(tmp_path / "photos" / "dog" / "b.jpg", (0, 0, 200), "JPEG")
    _save(tmp_path / "photos" / "cat" / "a.png", (200, 0, 0), "PNG")
    _save(tmp_path / "photos" / "cat" / "c.webp", (0, 200, 0), "WEBP")
    sent, total = messages(dataset="folder", path=str(tmp_path / "photos"), id_prefix="mine/")
    assert total is None
    assert [(m.key, m.labels, m.label_names, m.content_type) for m in sent] == [
        ("mine/cat/a.png", 0, "cat", "image/png"), ("mine/cat/c.webp", 0, "cat", "image/png"),  # WebP sent as PNG
        ("mine/dog/b.jpg", 1, "dog", "image/jpeg")]
    assert sent[0].value == (tmp_path / "photos" / "cat" / "a.png").read_bytes()
    assert Image.open(io.BytesIO(sent[1].value)).getpixel((0, 0))[1] > 150
    assert all(check(m, PHOTO_SPEC) is None for m in sent)


@pytest.mark.parametrize("layout,kw,fragment", [
    ({"a,b/x.png": "PNG"}, {}, "cannot hold a comma"),
    ({"train/cat/x.png": "PNG"}, {}, "--split train|test|all"),
    ({}, {}, "no such folder"),
    ({"x.png": "PNG"}, {}, "no images of a class"),
])
def test_a_folder_that_cannot_be_sent_says_why(tmp_path, layout, kw, fragment):
    root = tmp_path / "photos"
    for rel, fmt in layout.items():
        _save(root / rel, (1, 2, 3), fmt)
    with pytest.raises(CommandFailed, match=fragment.replace("|", r"\|")):
        messages(dataset="folder", path=str(root), **kw)


def test_numeric_class_folders_are_their_labels_without_names(tmp_path):
    _save(tmp_path / "p" / "3" / "x.png", (1, 2, 3), "PNG")
    _save(tmp_path / "p" / "10" / "y.png", (1, 2, 3), "PNG")
    sent, _ = messages(dataset="folder", path=str(tmp_path / "p"))
    assert [(m.labels, m.label_names) for m in sent] == [(10, None), (3, None)]


def test_a_folder_of_class_folders_given_as_the_source_gets_a_hint(tmp_path):
    from tests.test_cli_errors import run_cli

    _save(tmp_path / "photos" / "cat" / "a.png", (200, 0, 0), "PNG")
    out = run_cli("produce", str(tmp_path / "photos"), "--check", env={"STREAMHASH_IMAGE__RESIZE": "fill",
                                                                       "STREAMHASH_MODEL__CHANNELS": "3",
                                                                       "STREAMHASH_IMAGE__MODE": "rgb"})
    assert out.returncode == 0 and "1 would be indexed" in out.stdout, out.stderr
    assert f"--dataset folder --path {tmp_path / 'photos'}" in out.stderr
