"""Class names for labels: what people read beside a hit's bare integer labels.

``STREAMHASH_DATA__CLASS_NAMES`` is a dataset's name (``fashion-mnist``) or a JSON file: a list of
names (the label is the position) or an object mapping labels to names (``{"3": "Dress"}``).
"""

from __future__ import annotations

import json
from pathlib import Path

from streamhash.errors import ConfigError

KNOWN = {"fashion-mnist": "streamhash.data.fashion_mnist"}


def load_class_names(spec: str | None) -> dict[int, str]:
    """``{label: name}`` from the setting; empty when it is unset. ConfigError names what is wrong."""
    if not spec:
        return {}
    if spec in KNOWN:
        from streamhash.data.fashion_mnist import CLASSES

        return dict(enumerate(CLASSES))
    path = Path(spec)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"class names: cannot read {path} ({exc.strerror}); STREAMHASH_DATA__CLASS_NAMES is "
                          f"{', '.join(KNOWN)} or a JSON file") from None
    except ValueError as exc:
        raise ConfigError(f"class names: {path} is not JSON: {exc}") from None
    items = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    try:
        names = {int(label): str(name) for label, name in items}
    except (TypeError, ValueError):
        raise ConfigError(f"class names: {path} must hold a list of names or an object {{\"label\": \"name\"}}") from None
    if any(label < 0 for label in names):
        raise ConfigError(f"class names: {path} names a negative label")
    return names


def name_labels(labels, names: dict[int, str]) -> list[str] | None:
    """Each label's name (the label itself where the map has none); None for an unlabeled item."""
    return None if labels is None else [names.get(int(label), str(label)) for label in labels]
