"""Hamming backends by name: the one table that :func:`make_index`, the settings, the CLI and the radius cost model read.

A backend is a :class:`~streamhash.index.hamming.BinaryIndex` subclass implementing ``_topk`` and
``_range_rows``; adding one is a file holding the class and one line::

    register("mine", "mypackage.mine:MyIndex", scan_ns_per_row=0.5)

A target given as ``"module:Class"`` is imported when an index is first made, so naming a backend
loads none of its dependencies (torch, for ``torch``), and this module needs only the standard
library: the CLI lists the names without importing numpy. The settings hold a name as a plain string;
:func:`check_backend` refuses an unknown one where an index is set up (the query server's shards).

``auto`` is not a backend but a choice among them: the first of :data:`AUTO` whose class says it
is ``available()`` on this machine.

>>> "numpy" in backend_names() and backend_names()[0] == "auto"
True
>>> make_index(16, "numpy").backend
'numpy'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from streamhash.errors import ConfigError

AUTO = ("native", "numpy")


@dataclass(frozen=True)
class Backend:
    name: str
    target: str | type  # the BinaryIndex subclass, or "module:Class" imported on first use
    # A flat range scan's cost per row and 64-bit word of code, for choose_radius_strategy;
    # None (not measured) assumes numpy's, the slowest scan, which only ever favours the tables.
    scan_ns_per_row: float | None = None

    def load(self) -> type:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.target


_REGISTRY: dict[str, Backend] = {}


def register(name: str, target: str | type, *, scan_ns_per_row: float | None = None) -> None:
    """Make ``make_index(d, name)`` build ``target``; registering the same entry twice is harmless."""
    if name == "auto":
        raise ValueError("'auto' is the choice among the backends, not a name one can take")
    entry = Backend(name, target, scan_ns_per_row)
    if _REGISTRY.get(name, entry) != entry:
        raise ValueError(f"a Hamming backend named {name!r} is already registered")
    _REGISTRY[name] = entry


def backend_names() -> tuple[str, ...]:
    """Every name :func:`make_index` accepts: ``auto``, then the registered backends."""
    return ("auto", *_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}") from None


def check_backend(name: str) -> str:
    """``name`` if :func:`make_index` accepts it, else a :class:`~streamhash.errors.ConfigError` naming the choices:
    for the settings' ``server.backend`` when the query server starts, before any shard needs an index."""
    if name not in backend_names():
        raise ConfigError(f"server.backend must be one of {backend_names()}, got {name!r}")
    return name


def scan_ns_per_row(name: str) -> float:
    """The cost model's flat-scan constant for ``name``; numpy's for a name without one (``auto`` included)."""
    entry = _REGISTRY.get(name)
    if entry is None or entry.scan_ns_per_row is None:
        entry = _REGISTRY["numpy"]
    return entry.scan_ns_per_row


def make_index(d: int, backend: str = "auto", threads: int = 1):
    """A :class:`~streamhash.index.hamming.BinaryIndex` of ``d`` bits from the named backend.

    ``auto`` is the native kernel when it was built, else numpy; ``torch`` needs CUDA and raises
    RuntimeError without it.
    """
    if backend == "auto":
        backend = next(name for name in AUTO if get_backend(name).load().available())
    return get_backend(backend).load()(d, threads=threads)


# Flat-scan constants measured on the reference machine with benchmarks/bench_multihash.py
# (see streamhash.index.multihash for the rest of the cost model).
register("numpy", "streamhash.index.hamming:NumpyIndex", scan_ns_per_row=1.1)
register("native", "streamhash.index.hamming:NativeIndex", scan_ns_per_row=0.08)
register("torch", "streamhash.index.torch_backend:TorchIndex", scan_ns_per_row=0.08)
