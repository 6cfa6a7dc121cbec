"""CIFAR-10 and class-folder photos as data: the shared JPEG tarball (a few hundred images), a class-folder
tree as a directory and as an archive, and a small batch set in the official python format written here."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamhash.config import load_settings
from streamhash.data import cifar10
from streamhash.data.photos import PhotoFolderError, class_names, iter_photo_files, load_class_folders
from streamhash.errors import DatasetMissingError

TARBALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.gz"
needs_tarball = pytest.mark.skipif(not TARBALL.is_file(), reason=f"the CIFAR-10 JPEG tarball is not at {TARBALL}")


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tar(src: Path, dest: Path, prefix: str = "") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=prefix + path.relative_to(src).as_posix(), recursive=False)
    return dest


def _rng_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@needs_tarball
def test_the_shared_jpeg_tarball_read_in_one_pass():
    data = cifar10.load_split("test", source=TARBALL, per_class=20)
    assert data.classes == cifar10.CLASSES
    assert data.images.shape == (200, 32, 32, 3) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [20] * 10
    cat = next(f for f in iter_photo_files(TARBALL, "test") if f.path == "test/cat/0000.jpg")  # decoded on its own
    cat = np.asarray(Image.open(io.BytesIO(cat.data)).convert("RGB"))
    np.testing.assert_array_equal(data.images[data.labels == 3][0], cat)
    assert len({img.tobytes() for img in data.images}) == 200  # 200 different photos, not one repeated
    assert 60 < data.images.mean() < 200


@needs_tarball
def test_the_tarball_found_in_the_data_home(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMHASH_DATA__CIFAR10_DIR", raising=False)
    (tmp_path / "cifar10-jpg.tar.gz").symlink_to(TARBALL)
    assert cifar10.find_source(home=tmp_path) == tmp_path / "cifar10-jpg.tar.gz"
    train = cifar10.load_split("train", home=tmp_path, per_class=5)
    assert len(train) == 50 and train.classes[9] == "truck"


def test_a_directory_and_its_archive_give_the_same_arrays(tmp_path):
    imgs = _rng_images(6)
    files = {f"{split}/{cls}/{i:04d}.png": _png(imgs[k]) for k, (split, cls, i) in enumerate(
        [("train", "dog", 1), ("train", "dog", 0), ("train", "cat", 0), ("test", "cat", 0), ("test", "dog", 0),
         ("train", "cat", 1)])}
    files["train/cat/.hidden.png"] = _png(imgs[0])  # a hidden file is not a photo
    files["train/cat/notes.txt"] = b"not an image"
    tree = _tree(tmp_path / "tree", files)
    from_dir = load_class_folders(tree, split="train")
    assert from_dir.classes == ("cat", "dog")
    assert from_dir.labels.tolist() == [0, 0, 1, 1]
    # path order inside each class: cat/0000 (image 2), cat/0001 (image 5), dog/0000 (1), dog/0001 (0)
    np.testing.assert_array_equal(from_dir.images, imgs[[2, 5, 1, 0]])
    for prefix in ("", "CIFAR-10-images/"):  # one leading folder in an archive is fine
        from_tar = load_class_folders(_tar(tree, tmp_path / "tree.tar.gz", prefix), split="train")
        assert from_tar.classes == from_dir.classes
        np.testing.assert_array_equal(from_tar.images, from_dir.images)
        np.testing.assert_array_equal(from_tar.labels, from_dir.labels)
    test = load_class_folders(tree, split="test", per_class=1)
    assert test.labels.tolist() == [0, 1] and len(list(iter_photo_files(tree, "test"))) == 2


def test_own_photos_by_class_name_or_number_any_size_and_mode(tmp_path):
    imgs = _rng_images(4, seed=1, size=48)
    named = _tree(tmp_path / "named", {"tulip/a.png": _png(imgs[0]), "rose/b.png": _png(imgs[1], "RGBA"),
                                       "rose/c.jpg": _png(imgs[2][:40], "L")})
    with pytest.raises(PhotoFolderError, match="pass size="):  # 48x48 and 48x40: not stackable as they are
        load_class_folders(named)
    data = load_class_folders(named, size=(32, 32))
    assert data.classes == ("rose", "tulip") and data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 32, 32, 3)
    gray = data.images[1]  # the gray photo became RGB by repeating its band
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    numbered = _tree(tmp_path / "numbered", {"0/a.png": _png(imgs[0]), "3/b.png": _png(imgs[1])})
    data = load_class_folders(numbered)
    assert data.labels.tolist() == [0, 3] and data.classes == ("0", "1", "2", "3")
    assert class_names(["b", "a", "b"]) == ("a", "b")


def test_a_split_tree_read_without_a_split_is_refused_not_taken_as_classes(tmp_path):
    tree = _tree(tmp_path, {"train/cat/0.png": _png(_rng_images(1)[0])})
    with pytest.raises(PhotoFolderError, match="split="):
        load_class_folders(tree)
    with pytest.raises(PhotoFolderError, match="no image files"):
        load_class_folders(_tree(tmp_path / "empty", {"cat/readme.txt": b"x"}))


# -- the official python release, written here in its format: python 2 pickles (protocol 2, byte-string keys),
# each row 1024 red, then 1024 green, then 1024 blue values

def _official_batch(images: np.ndarray, labels: list[int], tag: bytes) -> bytes:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": tag, b"labels": labels, b"data": rows,
                         b"filenames": [b"f%d.png" % i for i in range(len(labels))]}, protocol=2)


def _official_release(folder: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for k, name in enumerate([*cifar10.BATCHES["train"], "test_batch"]):
        imgs, labels = _rng_images(per_batch, seed=10 + k), [(k + i) % 10 for i in range(per_batch)]
        (folder / name).write_bytes(_official_batch(imgs, labels, name.encode()))
        batches[name] = (imgs, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in cifar10.CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_the_official_python_release_folder_and_archive(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMHASH_DATA__CIFAR10_DIR", raising=False)
    batches = _official_release(tmp_path / "home" / cifar10.BATCHES_DIR)
    for source in (None, tmp_path / "renamed.tar.gz"):
        if source is not None:  # the archive as downloaded (here under another name), read without unpacking
            _tar(tmp_path / "home", source)
        train = cifar10.load_split("train", source=source, home=tmp_path / "home")
        assert train.classes == cifar10.CLASSES
        want = np.concatenate([batches[n][0] for n in cifar10.BATCHES["train"]])
        np.testing.assert_array_equal(train.images, want)  # the planes landed as (H, W, RGB)
        assert train.labels.tolist() == sum((batches[n][1] for n in cifar10.BATCHES["train"]), [])
        test = cifar10.load_split("test", source=source, home=tmp_path / "home")
        np.testing.assert_array_equal(test.images, batches["test_batch"][0])
    few = cifar10.load_split("train", home=tmp_path / "home", per_class=1)
    assert sorted(few.labels.tolist()) == list(range(8)) and len(cifar10.load_all(home=tmp_path / "home")) == 24
    monkeypatch.setenv("STREAMHASH_DATA__CIFAR10_DIR", str(tmp_path / "home"))
    assert cifar10.find_source(home=tmp_path / "elsewhere") == tmp_path / "home" / cifar10.BATCHES_DIR
    assert load_settings().data.cifar10_dir == tmp_path / "home"


def test_missing_cifar10_says_where_to_get_it_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMHASH_DATA__CIFAR10_DIR", raising=False)
    with pytest.raises(DatasetMissingError) as err:
        cifar10.load_split("train", home=tmp_path)
    msg = str(err.value)
    assert cifar10.URL in msg and f"{tmp_path}/{cifar10.OFFICIAL_ARCHIVE}" in msg and "STREAMHASH_DATA__CIFAR10_DIR" in msg


class _Planted:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_batch_that_would_run_code_is_refused_unrun(tmp_path):
    folder = tmp_path / cifar10.BATCHES_DIR
    _official_release(folder, per_batch=1)
    planted = _Planted()
    planted.target = str(tmp_path / "planted")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": planted, b"labels": [0]}, protocol=2))
    with pytest.raises(cifar10.CifarFormatError, match="posix.mkdir|os.mkdir"):
        cifar10.load_split("test", source=folder)
    assert not (tmp_path / "planted").exists()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, protocol=2))
    with pytest.raises(cifar10.CifarFormatError, match="3072"):
        cifar10.load_split("test", source=folder)
