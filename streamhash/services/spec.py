"""The image spec every process derives from its settings, so the worker, the learner, the query server and
``streamhash produce --check`` accept the same messages. Here, on the processes' side: the library's
:class:`~streamhash.records.ImageSpec` takes plain values and knows nothing of the settings."""

from __future__ import annotations

from streamhash.config import Settings
from streamhash.imaging import Conversion
from streamhash.records import ImageSpec


def image_spec(settings: Settings) -> ImageSpec:
    mc = settings.model
    return ImageSpec(mc.image_size, mc.image_size, mc.channels, settings.store.max_value_bytes,
                     max_pixels=settings.store.max_image_pixels, max_label=settings.learn.max_label,
                     max_labels=settings.learn.max_labels_per_item, conversion=Conversion(**settings.image.model_dump()))
