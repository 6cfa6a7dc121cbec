"""Label handling shared by the learner, the MI measure and the metrics.

Labels come as one int per item (single-label), as an iterable of ints per item (multi-label; an empty
set or ``None`` means unlabeled), or as a multi-hot matrix. Two items are neighbours iff their label
sets intersect.

>>> label_sets_to_multihot([0, [1, 2], None]).astype(int).tolist()
[[1, 0, 0], [0, 1, 1], [0, 0, 0]]
>>> neighbour_matrix([[7, 99999999999999999999], 7, None]).astype(int).tolist()
[[1, 1, 0], [1, 1, 0], [0, 0, 0]]
"""

from __future__ import annotations

import numpy as np


def normalise_label_sets(labels) -> list[frozenset[int]]:
    """Any accepted label form -> one frozenset per item (empty = unlabeled)."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return [frozenset(np.flatnonzero(row).tolist()) for row in labels]
    out = []
    for lab in labels:
        if lab is None:
            out.append(frozenset())
        elif isinstance(lab, (int, np.integer)):
            if lab < 0:
                raise ValueError(f"labels must be non-negative, got {lab}")
            out.append(frozenset((int(lab),)))
        else:
            s = frozenset(int(x) for x in lab)
            if any(x < 0 for x in s):
                raise ValueError(f"labels must be non-negative, got {sorted(s)}")
            out.append(s)
    return out


def label_sets_to_multihot(labels, num_classes: int | None = None) -> np.ndarray:
    """Any accepted label form -> (n, C) float32 multi-hot."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return labels.astype(np.float32)
    arr = np.asarray(labels) if not isinstance(labels, list) else None
    if arr is not None and arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        c = int(num_classes or (arr.max() + 1 if len(arr) else 1))
        out = np.zeros((len(arr), c), np.float32)
        out[np.arange(len(arr)), arr] = 1.0
        return out
    sets = normalise_label_sets(labels)
    c = int(num_classes or (max((max(s) for s in sets if s), default=-1) + 1) or 1)
    out = np.zeros((len(sets), c), np.float32)
    for i, s in enumerate(sets):
        for lab in s:
            out[i, lab] = 1.0
    return out


def neighbour_matrix(labels) -> np.ndarray:
    """(n, n) bool: the label sets of i and j intersect. Costs O(n x distinct labels), whatever the
    label values: one column per label that occurs, never one per value up to the largest."""
    sets = normalise_label_sets(labels)
    column = {lab: c for c, lab in enumerate(sorted(set().union(*sets)))}
    hot = np.zeros((len(sets), max(len(column), 1)), np.float32)
    for i, s in enumerate(sets):
        for lab in s:
            hot[i, column[lab]] = 1.0
    return (hot @ hot.T) > 0
