"""Labelled photos from a class-folder tree: a directory or a tar archive (read in one pass, never unpacked).

Two layouts, relative to the directory or the archive's root (one leading folder in an archive is fine):

- ``<class name>/<file>``: a user's own photos, one folder per class;
- ``train|test/<class name>/<file>``: a split dataset (CIFAR-10 as JPEG files has this layout); pass
  ``split``. A split tree read without ``split`` is refused rather than taken as classes "train" and "test".

Labels: class names sorted, so ``airplane, automobile, ...`` become 0, 1, ...; when every folder name is a
number, the number is the label (``3/`` is label 3, whatever other folders exist). Images are decoded to
RGB through the project's conversion rules (``streamhash.imaging``): without ``size`` every image must have
the first one's size; with ``size`` each is resampled (centre crop by default, ``Conversion.resize``).
Files are taken in path order, so a directory and the same tree archived give the same arrays.

>>> class_names(["cat", "airplane", "cat"])
('airplane', 'cat')
>>> class_names(["10", "2"])[2], len(class_names(["10", "2"]))
('2', 11)
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from streamhash.errors import DatasetMissingError, StreamhashError
from streamhash.imaging import Conversion, network_input

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "test")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class PhotoFolderError(StreamhashError):
    """A class-folder tree that cannot be read as labelled images (layout, sizes, no images)."""


@dataclass(frozen=True)
class LabeledImages:
    """``images`` (n, H, W, 3) uint8, ``labels`` (n,) int64, ``classes[label]`` the class name."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PhotoFile:
    class_name: str
    path: str  # inside the tree or archive, "/"-separated
    data: bytes


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def class_names(names: Iterable[str]) -> tuple[str, ...]:
    """label -> class name for the folder names ``names``: numeric names are their number, others sorted."""
    unique = set(names)
    if unique and all(n.isdigit() for n in unique):
        return tuple(str(i) for i in range(max(int(n) for n in unique) + 1))
    return tuple(sorted(unique))


def _classify(parts: tuple[str, ...], split: str | None) -> str | None:
    """The class of a file at ``parts`` (relative path), or None when it is outside ``split``."""
    if split is None:
        if len(parts) >= 3 and parts[-3] in SPLITS:
            raise PhotoFolderError(f"{'/'.join(parts)} is in a {parts[-3]}/ folder: this tree is split into "
                                   f"{'|'.join(SPLITS)}/<class>/; choose one with split=")
        return parts[-2]
    return parts[-2] if len(parts) >= 3 and parts[-3] == split else None


def _wanted(parts: tuple[str, ...]) -> bool:
    return (len(parts) >= 2 and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES
            and not any(p.startswith(".") for p in parts))


def iter_photo_files(source: Path | str, split: str | None = None) -> Iterator[PhotoFile]:
    """Every image file of the tree at ``source`` (a directory or a tar archive) with its class, as the raw
    bytes on disk (what a producer sends). A directory is walked in path order; an archive in its own order,
    in one pass."""
    source = Path(source)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if is_archive(source):
        with tarfile.open(source, "r|*") as tf:
            for member in tf:
                parts = PurePosixPath(member.name).parts
                if member.isfile() and _wanted(parts) and (cls := _classify(parts, split)) is not None:
                    yield PhotoFile(cls, member.name, tf.extractfile(member).read())
    elif source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            parts = path.relative_to(source).parts
            if _wanted(parts) and (cls := _classify(parts, split)) is not None:
                yield PhotoFile(cls, path.relative_to(source).as_posix(), path.read_bytes())
    else:
        raise DatasetMissingError(f"no photo folder or tar archive at {source}")


def photo_classes(source: Path | str, split: str | None = None) -> tuple[str, ...]:
    """label -> class name of the tree at ``source`` (:func:`class_names` of its class folders), from the file
    names alone: no image is read (an archive is still read through once)."""
    source = Path(source)
    if is_archive(source):
        with tarfile.open(source, "r|*") as tf:
            paths = [PurePosixPath(m.name).parts for m in tf if m.isfile()]
    elif source.is_dir():
        paths = [p.relative_to(source).parts for p in source.rglob("*") if p.is_file()]
    else:
        raise DatasetMissingError(f"no photo folder or tar archive at {source}")
    return class_names(c for parts in paths if _wanted(parts) and (c := _classify(parts, split)) is not None)


def decode_photo(data: bytes, size: tuple[int, int] | None = None, conversion: Conversion | None = None) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 by the project's rules; ``size`` (H, W) resamples, None keeps the size."""
    with Image.open(io.BytesIO(data)) as img:
        shape = (size or (img.height, img.width)) + (3,)
        conv = conversion or Conversion(mode="rgb", resize="fill" if size else "exact")
        return network_input(img, shape, conv)


def load_class_folders(source: Path | str, split: str | None = None, per_class: int | None = None,
                       size: tuple[int, int] | None = None, conversion: Conversion | None = None) -> LabeledImages:
    """The labelled images of a class-folder tree (see the module's text). ``per_class`` keeps the first files
    of each class in path order (only those are decoded); ``size`` (H, W) resamples every image to it."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for f in iter_photo_files(source, split):
        by_class.setdefault(f.class_name, []).append((f.path, f.data))
    if not by_class:
        where = f"{source} (split {split})" if split else str(source)
        raise PhotoFolderError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders under {where}")
    classes = class_names(by_class)
    label_of = {name: i for i, name in enumerate(classes)}
    images, labels, first = [], [], None
    for name in sorted(by_class, key=label_of.__getitem__):
        files = sorted(by_class[name])[:per_class]
        for path, data in files:
            arr = decode_photo(data, size, conversion)
            first = first or (path, arr.shape)
            if arr.shape != first[1]:
                raise PhotoFolderError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is "
                                       f"{first[1][1]}x{first[1][0]}: pass size=(H, W) to resample every image")
            images.append(arr)
        labels += [label_of[name]] * len(files)
    return LabeledImages(np.stack(images), np.asarray(labels, np.int64), classes)
