"""A frozen feature extractor run by ONNX Runtime on the CPU, exported once from the same torch weights.

Why: the frozen EfficientNet-Lite0 in torch eager ran 37 images/s at 224x224 (batch 16, 2 threads) where
ONNX Runtime ran 212 on the same machine (issue 23; ``benchmarks/bench_photos.py`` measures it again).
Torch stays the engine where the input lives on CUDA; the backbone decides that per call.

The exported graph is (n, 3, S, S) float in [-1, 1] -> (n, F) pooled feature, batch axis dynamic, S fixed.
It is cached as ``<cache_dir>/onnx/<name>-<S>-<weights hash>.onnx`` (the data home, ``data/`` unless
``STREAMHASH_DATA__HOME`` says otherwise), so a process exports at most once per weights and input size and
every later process, on any thread setting, loads the file. Other weights give another file name, never a
stale graph. The write is atomic (temporary file, then rename): two processes exporting at once each leave a
whole file. ONNX Runtime's intra-op threads follow ``torch.get_num_threads()`` in the calling thread (the
worker sets it per encoder thread), one session per thread count.

Needs the extra ``natural`` (``onnxruntime``, ``onnx``); without onnxruntime :func:`onnx_available` is False
and the backbone keeps torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INSTALL_HINT = "the ONNX Runtime engine needs the optional packages: pip install onnxruntime onnx (or 'streamhash[natural]')"
OPSET = 17
QUANTIZE = (None, "dynamic", "static")


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache_dir() -> Path:
    """The data home (``DataSettings.home``): the library has no settings object at hand, so it reads the same
    environment variable the settings model reads."""
    return Path(os.environ.get("STREAMHASH_DATA__HOME", "data"))


def weights_hash(module: nn.Module | dict) -> str:
    """sha256 over every parameter and buffer (name, shape, dtype, values), independent of memory format; a dict
    is taken as the state to hash (a part of a module's)."""
    h = hashlib.sha256()
    state = module if isinstance(module, dict) else module.state_dict()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def to_network_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (n, H, W), (n, H, W, C) -> float (n, 3, size, size) in [-1, 1]; a float (n, C, H, W) array or
    tensor is taken as already in [-1, 1]. Gray repeats to 3 channels; another size is resized bilinearly,
    exactly as the torch backbone does."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            images = np.ascontiguousarray(images)
            x = torch.from_numpy(images if images.flags.writeable else images.copy())  # a read-only buffer (LMDB, Kafka)
            if x.ndim == 3:
                x = x.unsqueeze(-1)
            if x.ndim != 4:
                raise ValueError(f"expected uint8 images (n,H,W) or (n,H,W,C), got shape {tuple(images.shape)}")
            x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        else:
            x = torch.from_numpy(np.asarray(images, np.float32))
    else:
        x = images.detach().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (n, 1|3, H, W) network input, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous()


class FeatureEngine:
    """``features(images) -> (n, F) float32`` through ONNX Runtime, from a frozen torch feature module.

    ``module`` maps (n, 3, size, size) in [-1, 1] to (n, F); it is exported on first use (or found in the
    cache). ``quantize`` runs an int8 copy instead: ``"dynamic"`` (weights only, no data needed) or ``"static"``
    (weights and activations, QDQ per channel, its ranges calibrated on ``calibration``: uint8 images or network
    input; the file name carries a hash of them). bench_photos measures both against fp32 in images/s and in
    feature fidelity: here dynamic ran 5-7x slower with features at cosine ~0.77, static about 2x faster at ~0.98.
    """

    def __init__(self, module: nn.Module, name: str, size: int, cache_dir: Path | None = None,
                 quantize: str | None = None, calibration: np.ndarray | torch.Tensor | None = None,
                 out_shape: tuple[int, ...] | None = None, weights: dict | None = None):
        if not onnx_available():
            raise ImportError(INSTALL_HINT)
        self.module = module
        self.size = int(size)
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if quantize == "static" and calibration is None:
            raise ValueError("static quantization needs calibration images (a few hundred typical inputs)")
        self.quantize = quantize
        self.calibration = None if calibration is None else to_network_input(calibration, self.size).numpy()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.name = f"onnxruntime:{name}-{self.size}" + (f"-int8-{quantize}" if quantize else "")
        self._base = name
        # what names the exported file: the module's whole state unless told which part of it the graph holds (a
        # frozen part sharing its network with a tail that trains: the tail's weights must not name the export)
        self._weights = weights
        # one image's output; for an empty batch (a pooled module says it by ``out_features``)
        self.out_shape = tuple(out_shape) if out_shape is not None else (int(getattr(module, "out_features", 0)),)
        self._path: Path | None = None
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()
        self.max_batch = 64

    # an ONNX Runtime session neither pickles nor deep-copies; a copy opens its own on first use
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sessions"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The cached .onnx file, exported now if it is not there yet."""
        with self._lock:
            if self._path is None:
                self._path = self._ensure_file()
            return self._path

    def _file_name(self, suffix: str = "") -> Path:
        digest = weights_hash(self.module if self._weights is None else self._weights)[:16]
        return self.cache_dir / "onnx" / f"{self._base}-{self.size}-{digest}{suffix}.onnx"

    def _ensure_file(self) -> Path:
        fp32 = self._file_name()
        if not fp32.is_file():
            _atomic_write(fp32, lambda tmp: export_onnx(self.module, self.size, tmp))
            log.info("exported %s to %s", self._base, fp32)
        if self.quantize is None:
            return fp32
        if self.quantize == "dynamic":
            int8 = self._file_name("-int8-dynamic")
            if not int8.is_file():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                _atomic_write(int8, lambda tmp: quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QUInt8))
            return int8
        calib = hashlib.sha256(self.calibration.tobytes()).hexdigest()[:8]
        int8 = self._file_name(f"-int8-static-{calib}")
        if not int8.is_file():
            _atomic_write(int8, lambda tmp: quantize_static_qdq(fp32, tmp, self.calibration))
        return int8

    def session(self, threads: int | None = None):
        import onnxruntime as ort

        threads = threads or torch.get_num_threads()
        path = self.path
        with self._lock:
            sess = self._sessions.get(threads)
            if sess is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                self._sessions[threads] = sess
            return sess

    def run(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(n, 3, size, size) float32 in [-1, 1] -> (n, *out_shape) float32."""
        arr = x.detach().cpu().float().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x, np.float32)
        if len(arr) == 0:
            return np.zeros((0, *self.out_shape), np.float32)
        sess = self.session()
        # in chunks: a 1024-image batch at 224x224 would hold gigabytes of activations in ONNX Runtime's arena
        # (which keeps its peak), at no gain in images/s over 64
        return np.concatenate([sess.run(None, {"input": arr[i:i + self.max_batch]})[0]
                               for i in range(0, len(arr), self.max_batch)])

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (n, H, W[, C]) images or float (n, C, H, W) in [-1, 1] -> (n, F) float32 features."""
        return self.run(to_network_input(images, self.size))


def export_onnx(module: nn.Module, size: int, path: Path) -> None:
    """Trace ``module`` at (1, 3, size, size) into ONNX with a dynamic batch axis (TorchScript exporter)."""
    was_training = module.training
    module.eval()
    try:
        dummy = torch.zeros(1, 3, size, size)
        # the TorchScript exporter warns about constant folding of Slice ops (this graph runs them correctly) and
        # about its own deprecation (dynamo=False is the path that exports this network as it is)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (dummy,), str(path), input_names=["input"], output_names=["features"],
                              dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    finally:
        module.train(was_training)


def quantize_static_qdq(fp32: Path, dest: Path, calibration: np.ndarray, batch: int = 16) -> None:
    """int8 weights (per channel) and activations (ranges from ``calibration``, network input) as QDQ nodes,
    which ONNX Runtime's CPU kernels run as integer convolutions."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred, graph folded: what the quantizer expects
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _atomic_write(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".tmp.onnx", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from processes running as another user
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
