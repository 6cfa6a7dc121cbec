"""What every process derives from its settings in the same way, on the processes' side (the library takes plain
values and knows nothing of the settings): the image spec, so the worker, the learner, the query server and
``streamhash produce --check`` accept the same messages; and the internal topics' HMAC key, so the learner signs
with the key the workers verify with."""

from __future__ import annotations

from streamhash.config import Settings
from streamhash.imaging import Conversion
from streamhash.records import ImageSpec


def model_key(settings: Settings) -> bytes | None:
    """The models and codes topics' HMAC key, if one is set (``security.model_key``)."""
    key = settings.security.model_key
    return key.get_secret_value().encode() if key else None


def image_spec(settings: Settings) -> ImageSpec:
    mc = settings.model
    return ImageSpec(mc.image_size, mc.image_size, mc.channels, settings.store.max_value_bytes,
                     max_pixels=settings.store.max_image_pixels, max_label=settings.learn.max_label,
                     max_labels=settings.learn.max_labels_per_item, conversion=Conversion(**settings.image.model_dump()))
