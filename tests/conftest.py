"""Shared fixtures: a real Tansu broker process, synthetic class-structured images, free ports."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from streamhash.config import KafkaSettings


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "integration" in item.keywords:  # real processes: `make test-quick` (-m "not slow") leaves them out
            item.add_marker(pytest.mark.slow)
    _scale_timeouts(config, items)


def _scale_timeouts(config, items) -> None:
    """pytest-timeout's limit (pyproject's, --timeout's or a test's own mark) times STREAMHASH_TEST_TIME_SCALE."""
    from pytest_timeout import get_env_settings

    from tests.support import TIME_SCALE

    if TIME_SCALE == 1:
        return
    default = get_env_settings(config).timeout
    for item in items:
        mark = item.get_closest_marker("timeout")
        limit = mark.args[0] if mark and mark.args else (mark.kwargs.get("timeout") if mark else None) or default
        if limit:
            item.add_marker(pytest.mark.timeout(float(limit) * TIME_SCALE), append=False)  # the closest mark


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu) on a free loopback port, stopped by PID at the end."""
    from streamhash.kafka.broker import EmbeddedBroker

    b = EmbeddedBroker(home=tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def kafka_settings(broker) -> KafkaSettings:
    """Fresh topic names and group per test, so tests share the broker without seeing each other."""
    tag = uuid.uuid4().hex[:8]
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"images-{tag}", dlq_topic=f"images-{tag}.dlq",
                         group_id=f"group-{tag}")


def synthetic_images(n: int, *, classes: int = 10, seed: int = 0, size: int = 28, noise: float = 40,
                     shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured gray images: a fixed random template per class (templates from ``seed`` % 1000,
    so two calls with seeds differing by 1000 share classes), Gaussian noise, and a random shift."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(seed % 1000).integers(0, 256, size=(classes, size, size)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    images = templates[labels] + rng.normal(0, noise, size=(n, size, size))
    if shift:
        dx, dy = rng.integers(-shift, shift + 1, (2, n))
        images = np.stack([np.roll(img, (a, b), axis=(0, 1)) for img, a, b in zip(images, dx, dy)])
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture
def images():
    return synthetic_images
