"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upscaled to Fashion-MNIST's 28x28.

The second domain of the ``domain-shift`` protocol: a real dataset that ships inside a package, so it
needs no download. Each 8x8 image (ink 0-16) is scaled to 0-255, resized bilinearly to 20x20 and
centred in a 28x28 frame with a 4-pixel border, the way MNIST frames its digits.
"""

from __future__ import annotations

import numpy as np

from streamhash.errors import DatasetMissingError

def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 28, 28) uint8, labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # an optional extra, like matplotlib for the plots
        raise DatasetMissingError("the digits dataset comes with scikit-learn: pip install -e '.[eval]'") from exc
    from PIL import Image

    d = load_digits()
    small = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.zeros((len(small), 28, 28), np.uint8)
    for i, img in enumerate(small):
        out[i, 4:24, 4:24] = np.asarray(Image.fromarray(img).resize((20, 20), Image.BILINEAR))
    return out, d.target.astype(np.int64)
