"""CIFAR-10 (50k train + 10k test, 32x32 RGB, 10 classes) from its official python release or as image files.

Read, whichever is found first, in each place looked at:

- the official python release: the folder ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``) or the archive ``cifar-10-python.tar.gz`` itself, read in one pass without unpacking;
- a class-folder tree of image files, ``train|test/<class name>/*.jpg|png`` (``streamhash.data.photos``), as a
  folder ``cifar10/`` or an archive ``cifar10-jpg.tar.gz`` / ``cifar10.tar.gz``.

Places, in order: an explicit path (a folder holding one of those, or the folder/archive itself),
``$STREAMHASH_DATA__CIFAR10_DIR`` (``DataSettings.cifar10_dir``), then the data home
(``$STREAMHASH_DATA__HOME``, ``data/`` by default). A missing dataset raises DatasetMissingError saying
where to get it and where to put it. Class names come from ``batches.meta`` or the sorted folder names
(the same ten, in the same order). The pickles are read by an unpickler that builds only numpy arrays,
lists, dicts and strings: a pickle is code, and a data folder is no place to run any.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from streamhash.data.photos import LabeledImages, is_archive, load_class_folders
from streamhash.errors import DatasetMissingError, StreamhashError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
FOLDER_NAMES = ("cifar10", "cifar10-jpg.tar.gz", "cifar10.tar.gz")
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META = "batches.meta"

HOW_TO_GET = (
    "CIFAR-10 was not found. Get the official python release:\n"
    "  mkdir -p {home} && curl -L -o {home}/{archive} {url}\n"
    "(that archive is read as it is; unpacking it to {home}/{batches}/ works too), or point\n"
    "STREAMHASH_DATA__CIFAR10_DIR at a folder holding it, or at a class-folder tree train|test/<class>/*.png\n"
    "(or a .tar.gz of one). Looked in: {looked}"
)


class CifarFormatError(StreamhashError):
    """A CIFAR-10 batch file that is not in the official format (or holds something other than data)."""


def data_home() -> Path:
    return Path(os.environ.get("STREAMHASH_DATA__HOME", "data"))


def candidate_paths(explicit: Path | None = None, home: Path | None = None) -> list[Path]:
    dirs = [Path(explicit)] if explicit else []
    env = os.environ.get("STREAMHASH_DATA__CIFAR10_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(home) if home else data_home())
    return dirs


def _resolve(place: Path) -> Path | None:
    """The readable CIFAR-10 at ``place``: the place itself, or one of the known names inside it."""
    if is_archive(place) or (place / META).is_file() or (place / "train").is_dir():
        return place
    if place.is_dir():
        for name in (BATCHES_DIR, OFFICIAL_ARCHIVE, *FOLDER_NAMES):
            candidate = place / name
            if candidate.exists() and _resolve(candidate) == candidate:
                return candidate
    return None


def find_source(explicit: Path | None = None, home: Path | None = None) -> Path:
    places = candidate_paths(explicit, home)
    for place in places:
        found = _resolve(place)
        if found is not None:
            return found
    home = Path(home) if home else data_home()
    raise DatasetMissingError(HOW_TO_GET.format(home=home, archive=OFFICIAL_ARCHIVE, url=URL, batches=BATCHES_DIR,
                                                looked=", ".join(map(str, places))))


class _DataUnpickler(pickle.Unpickler):
    # what numpy needs to rebuild an ndarray (numpy 1 and 2 module names); nothing that runs code
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise CifarFormatError(f"a CIFAR-10 batch may hold only arrays, lists and strings; it asks for {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved it; the old name warns
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle(raw: bytes, name: str) -> dict:
    try:
        obj = _DataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except CifarFormatError:
        raise
    except Exception as exc:
        raise CifarFormatError(f"{name} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{name} is not a CIFAR-10 python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch["data"], np.uint8)
        labels = np.asarray(batch["labels"], np.int64)
    except KeyError as exc:
        raise CifarFormatError(f"{name} has no {exc.args[0]!r} entry") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise CifarFormatError(f"{name}: data {data.shape} and {len(labels)} labels, expected (n, 3072) and n labels")
    # each row is 1024 red, 1024 green, 1024 blue values, rows of 32 pixels
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_batches(source: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Raw bytes of the named batch files (and ``batches.meta``), from the folder or, in one pass, the archive."""
    wanted = set(names) | {META}
    if source.is_dir():
        missing = sorted(n for n in wanted if not (source / n).is_file())
        if missing:
            raise DatasetMissingError(f"{source} lacks {', '.join(missing)}: the official release has them all ({URL})")
        return {n: (source / n).read_bytes() for n in wanted}
    found: dict[str, bytes] = {}
    with tarfile.open(source, "r|*") as tf:
        for member in tf:
            base = PurePosixPath(member.name).name
            if member.isfile() and base in wanted:
                found[base] = tf.extractfile(member).read()
    missing = sorted(wanted - set(found))
    if missing:
        raise DatasetMissingError(f"{source} lacks {', '.join(missing)}: the official release has them all ({URL})")
    return found


def _is_official(source: Path) -> bool:
    """The python release (batches), not an image tree: by its files, so a renamed archive still reads."""
    if source.is_dir():
        return (source / META).is_file()
    names = {META, "readme.html", *BATCHES["train"], *BATCHES["test"]}
    with tarfile.open(source, "r|*") as tf:
        files = (PurePosixPath(m.name).name for m in tf if m.isfile())
        return any(name in names for name, _ in zip(files, range(3)))  # the release opens with them


def load_split(split: str, source: Path | None = None, home: Path | None = None,
               per_class: int | None = None) -> LabeledImages:
    """CIFAR-10's ``train`` or ``test`` split: images (n, 32, 32, 3) uint8, labels (n,), class names.
    ``per_class`` keeps the first images of each class (in file order) — a few for a test."""
    if split not in BATCHES:
        raise ValueError(f"split must be one of {tuple(BATCHES)}, got {split!r}")
    src = find_source(source, home)
    if not _is_official(src):
        return load_class_folders(src, split=split, per_class=per_class)
    raw = _read_batches(src, BATCHES[split])
    meta = _unpickle(raw[META], META)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", CLASSES))
    parts = [_batch_arrays(_unpickle(raw[n], n), n) for n in BATCHES[split]]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise CifarFormatError(f"labels {labels.min()}..{labels.max()} outside the {len(classes)} classes of {META}")
    if per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(classes))]))
        images, labels = images[keep], labels[keep]
    return LabeledImages(images, labels, classes)


def load_all(source: Path | None = None, home: Path | None = None) -> LabeledImages:
    """All 60,000 images, train then test, as the class-incremental protocol draws from them."""
    train, test = load_split("train", source, home), load_split("test", source, home)
    return LabeledImages(np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels]),
                         train.classes)
