"""Fashion-MNIST from its four IDX files (60k train + 10k test, 28x28 gray, 10 classes).

Looked for, in order: an explicit folder, ``$STREAMHASH_DATA__FASHION_MNIST_DIR``, the Debian
package path, and the project's own data folder (where ``make data`` unpacks the package
without root). A missing dataset raises DatasetMissingError that says how to get it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from streamhash.errors import DatasetMissingError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PROJECT_DIR = Path("data/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

HOW_TO_GET = (
    "Fashion-MNIST was not found. Get it with one of:\n"
    "  sudo apt-get install dataset-fashion-mnist          (Debian/Ubuntu, installs to {debian})\n"
    "  make data                                            (unpacks the Debian package into ./data without root)\n"
    "  download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist\n"
    "  into a folder and set STREAMHASH_DATA__FASHION_MNIST_DIR=/that/folder\n"
    "Looked in: {looked}"
)


N_IMAGES = 70_000  # 60,000 train + 10,000 test: what `streamhash produce --dataset fashion-mnist` sends
ID_PREFIX = "fmnist-"  # message ids are this and the index in load_all's order: one image, one id, however shuffled

def candidate_dirs(explicit: Path | None = None) -> list[Path]:
    dirs = [explicit] if explicit else []
    env = os.environ.get("STREAMHASH_DATA__FASHION_MNIST_DIR")
    if env:
        dirs.append(Path(env))
    dirs += [DEBIAN_DIR, PROJECT_DIR, Path(__file__).resolve().parents[2] / PROJECT_DIR]
    return dirs


def find_dir(explicit: Path | None = None) -> Path:
    dirs = candidate_dirs(explicit)
    for d in dirs:
        if all((d / f).is_file() for pair in FILES.values() for f in pair):
            return d
    raise DatasetMissingError(HOW_TO_GET.format(debian=DEBIAN_DIR, looked=", ".join(map(str, dirs))))


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def load_split(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) int64) for ``train`` or ``test``."""
    d = find_dir(folder)
    img_name, lab_name = FILES[split]
    labels = _read_idx(d / lab_name, 8).astype(np.int64)
    images = _read_idx(d / img_name, 16).reshape(len(labels), 28, 28)
    return images, labels


def load_all(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (train then test) and labels, as the online-hashing protocol uses them."""
    xtr, ytr = load_split("train", folder)
    xte, yte = load_split("test", folder)
    return np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
