"""``streamhash produce --dataset cifar10`` and ``--dataset folder --path DIR``: labelled photos as messages,
each with its class name (the ``label-names`` header), so the index keeps the names and the search page
shows "cat", not "labels 3".

Image files are sent as they are on disk: a JPEG stays the JPEG it was (no second lossy pass), a PNG the
PNG; another format (BMP, GIF, WebP, TIFF) becomes a PNG, the contract's lossless type. CIFAR-10's
official python release holds arrays, sent as PNG (or ``.npy`` with ``--format npy``).

Ids: CIFAR-10's are ``cifar10-<split>-<class>-<NNNN>``, NNNN the image's place within its class in the
split, whichever form it comes in (the JPEG tree numbers its files that way), so both forms index under the
same ids. A folder's are the file's path in the tree (``cat/IMG_0001.jpg``), after ``--id-prefix``:
sending the folder again overwrites instead of duplicating.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from streamhash.cli.common import CommandFailed
from streamhash.errors import EXIT_NOINPUT, EXIT_USAGE

AS_IS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def photo_messages(args, settings) -> tuple[Iterator, int | None]:
    """The messages of ``--dataset cifar10|folder`` and how many there are when that is known."""
    from streamhash.data import photos

    splits = ("train", "test") if args.split in (None, "all") else (args.split,)
    try:
        if args.per_class is not None and args.per_class < 1:
            raise CommandFailed(f"--per-class must be at least 1, got {args.per_class}", EXIT_USAGE)
        if args.dataset == "cifar10":
            messages, total = _cifar10(args, settings, splits)
        else:
            messages, total = _folder(args, splits), None
        if settings.produce.shuffle_seed is not None:  # a stream of one class after another teaches nothing early
            import numpy as np

            listed = list(messages)
            order = np.random.default_rng(settings.produce.shuffle_seed).permutation(len(listed))
            return (listed[i] for i in order), len(listed)
        first = next(messages, None)
    except photos.PhotoFolderError as exc:
        raise CommandFailed(str(exc).replace("choose one with split=", "choose one with --split train|test|all"),
                            EXIT_NOINPUT) from None
    if first is None:
        raise CommandFailed(f"no images of a class under {args.path}" + (f" (split {args.split})" if args.split else ""),
                            EXIT_NOINPUT)
    return itertools.chain([first], messages), (None if args.per_class else total)


def _cifar10(args, settings, splits) -> tuple[Iterator, int | None]:
    """CIFAR-10 where ``streamhash eval`` finds it (``--path``, STREAMHASH_DATA__CIFAR10_DIR, the data home);
    DatasetMissingError (exit 3) says where to get it and where to put it."""
    from streamhash.data import cifar10

    source = cifar10.find_source(Path(args.path) if args.path else settings.data.cifar10_dir, settings.data.home)
    if cifar10._is_official(source):
        return _cifar10_arrays(source, splits, settings.produce.format, args.per_class), None
    label_of = {name: i for i, name in enumerate(cifar10.CLASSES)}

    def messages():
        for split in splits:
            for f in _files(source, split, args.per_class):
                if f.class_name not in label_of:
                    raise CommandFailed(f"{f.path}: {f.class_name!r} is not a CIFAR-10 class ({', '.join(cifar10.CLASSES)})",
                                        EXIT_NOINPUT)
                key = f"cifar10-{split}-{f.class_name}-{PurePosixPath(f.path).stem}"
                yield _outgoing(key, f, label_of[f.class_name])

    return messages(), 50_000 * ("train" in splits) + 10_000 * ("test" in splits)


def _cifar10_arrays(source, splits, fmt: str, per_class: int | None) -> Iterator:
    from streamhash.data import cifar10
    from streamhash.kafka.produce import Outgoing
    from streamhash.records import encode_npy, encode_png

    encode, ctype = (encode_png, "image/png") if fmt == "png" else (encode_npy, "application/x-npy")
    for split in splits:
        ds = cifar10.load_split(split, source, per_class=per_class)
        seen = [0] * len(ds.classes)
        for image, label in zip(ds.images, ds.labels.tolist()):
            name = ds.classes[label]
            yield Outgoing(f"cifar10-{split}-{name}-{seen[label]:04d}", encode(image), ctype, label, name)
            seen[label] += 1


def _folder(args, splits) -> Iterator:
    """A user's class-folder tree: labels are the sorted class names (numbers when every folder is one)."""
    from streamhash.data import photos

    if not args.path:
        raise CommandFailed("--dataset folder needs --path: a folder (or .tar.gz) with one folder of photos per class",
                            EXIT_USAGE)
    source = Path(args.path)
    if not source.exists():
        raise CommandFailed(f"no such folder: {source}", EXIT_NOINPUT)
    split_tree = args.split is not None
    classes = photos.photo_classes(source, splits[0] if split_tree else None)
    if split_tree and len(splits) > 1:
        classes = photos.class_names([*classes, *photos.photo_classes(source, splits[1])])
    if bad := [c for c in classes if "," in c]:
        raise CommandFailed(f"class folder {bad[0]!r}: a class name cannot hold a comma (the label-names header "
                            "separates names by commas); rename the folder", EXIT_USAGE)
    label_of = {name: i for i, name in enumerate(classes)}
    prefix = args.id_prefix or ""
    for split in splits if split_tree else (None,):
        for f in _files(source, split, args.per_class):
            yield _outgoing(prefix + f.path, f, label_of[f.class_name])


def _files(source, split, per_class: int | None):
    """The tree's files of ``split``, the first ``per_class`` met of each class (all without it)."""
    from streamhash.data import photos

    counts: dict[str, int] = {}
    try:
        for f in photos.iter_photo_files(source, split):
            counts[f.class_name] = n = counts.get(f.class_name, 0) + 1
            if per_class is None or n <= per_class:
                yield f
    except OSError as exc:
        raise CommandFailed(f"cannot read {getattr(exc, 'filename', None) or source}: {exc.strerror or exc}",
                            EXIT_NOINPUT) from None


def _outgoing(key: str, f, label: int):
    """A file's message: its bytes as they are when the contract takes its type, else as a PNG."""
    from PIL import Image

    from streamhash.kafka.produce import Outgoing

    ctype = AS_IS.get(PurePosixPath(f.path).suffix.lower())
    data = f.data
    if ctype is None:
        try:
            with Image.open(io.BytesIO(f.data)) as img:
                out = io.BytesIO()
                img.save(out, format="PNG")
        except Exception as exc:  # noqa: BLE001 -- a damaged file: said with its path, the others still go
            raise CommandFailed(f"cannot read {f.path} as an image: {type(exc).__name__}: {exc}", EXIT_NOINPUT) from None
        data, ctype = out.getvalue(), "image/png"
    # numeric class folders are their own names: no label-names header to say "3" is called "3"
    name = None if f.class_name == str(label) else f.class_name
    return Outgoing(key, data, ctype, label, name)

