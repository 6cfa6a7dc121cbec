"""The hash network: a backbone, a linear hash head, and u = tanh(F(x)).

Backbones are registered by name (:func:`register_backbone`); the config names one, so a
serialised network (:meth:`HashNet.to_bytes`) is rebuilt with the backbone it was trained with.

>>> import numpy as np
>>> net = HashNet(HashNetConfig(bits=16, seed=0))
>>> codes = net.encode(np.zeros((3, 28, 28), np.uint8))
>>> codes.shape, codes.dtype
((3, 2), dtype('uint8'))
>>> HashNet.from_bytes(net.to_bytes()).encode(np.zeros((3, 28, 28), np.uint8)).tolist() == codes.tolist()
True

What the store keeps for a network (its **stored input**) follows from its backbone. A backbone trained end to
end (``small_cnn``) takes the image itself: :meth:`HashNet.prepare` returns the images as they are. A frozen
backbone (``frozen = True``: a pretrained one) is split at its ``cut``: the frozen part runs once per image, in
the engine made for the device (:mod:`streamhash.model.engine`), and its output (float16) is the stored input;
the network's trainable part (the backbone's ``tail``, then the hash head) runs on it. :meth:`encode`,
:meth:`encode_real`, :meth:`to_tensor` and :meth:`forward` take stored inputs; :meth:`encode_images` takes
images. A learning round and a re-encode therefore read stored inputs and never run the frozen part again.
A frozen backbone provides ``prepare(images) -> float16 array``, ``tail`` (a module), ``stored_shape`` and
``cut``; without them a backbone is taken as trained end to end.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from streamhash.codes import pack_signs
from streamhash.errors import ConfigError


@dataclass(frozen=True)
class HashNetConfig:
    bits: int = 32
    backbone: str = "small_cnn"
    image_size: int = 28
    channels: int = 1
    seed: int = 0
    # where a frozen backbone is split ("": its default, the pooled feature); recorded so a serialised network
    # rebuilds the same split (a network saved before cuts existed has none: the default)
    cut: str = ""
    # a frozen backbone's input side in pixels, images resized to it (0: the backbone's own, 224 for EfficientNet-Lite0)
    input_size: int = 0


class SmallCNN(nn.Module):
    """Two conv blocks and a dense layer; sized for 28x28 gray or 32x32 colour, trained end to end.

    Kept small on purpose: the ingest path encodes every image on 2 CPU cores.
    """

    out_features = 256
    frozen = False

    def __init__(self, channels: int):
        super().__init__()
        # Strided convolutions instead of conv+pool: a quarter of the multiply-adds at the
        # same receptive field, which is what lets ingest keep up on two CPU cores.
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, self.out_features), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


BackboneBuilder = Callable[[HashNetConfig], nn.Module]
_BACKBONES: dict[str, BackboneBuilder | str] = {}


def register_backbone(name: str, build: BackboneBuilder | str) -> None:
    """Make ``HashNetConfig(backbone=name)`` use ``build(cfg)``: a module mapping (n, C, H, W) images to
    (n, out_features) features, with an ``out_features`` attribute. A ``"module:function"`` string is
    imported when the backbone is first built, so an optional dependency loads only for its backbone.
    Registering the same builder twice is harmless."""
    if _BACKBONES.get(name, build) != build:
        raise ValueError(f"a backbone named {name!r} is already registered")
    _BACKBONES[name] = build


def backbone_names() -> tuple[str, ...]:
    return tuple(_BACKBONES)


class UnknownBackbone(ConfigError, ValueError):
    """``model.backbone`` names no registered backbone: the settings hold any name, the network refuses it when built."""


def build_backbone(cfg: HashNetConfig) -> nn.Module:
    build = _BACKBONES.get(cfg.backbone)
    if build is None:
        raise UnknownBackbone(f"unknown backbone {cfg.backbone!r} (model.backbone); registered: {backbone_names()}")
    if isinstance(build, str):
        module, _, attr = build.partition(":")
        build = getattr(importlib.import_module(module), attr)
    return build(cfg)


register_backbone("small_cnn", lambda cfg: SmallCNN(cfg.channels))
register_backbone("efficientnet_lite0", "streamhash.model.efficientnet:from_config")  # optional packages


def images_to_tensor(images: np.ndarray, cfg: HashNetConfig) -> torch.Tensor:
    """uint8 images (n, H, W) or (n, H, W, C) -> float tensor (n, C, H, W) scaled to [-1, 1]."""
    images = np.ascontiguousarray(images)
    x = torch.from_numpy(images if images.flags.writeable else images.copy())
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected (n,H,W) or (n,H,W,C) images, got shape {tuple(images.shape)}")
    return x.float().div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)


class HashNet(nn.Module):
    def __init__(self, cfg: HashNetConfig):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.backbone = build_backbone(cfg)
        self.frozen = bool(getattr(self.backbone, "frozen", False))
        self.head = nn.Linear(self.backbone.out_features, cfg.bits)
        # NHWC: oneDNN's convolutions on small images run 2.5x faster than NCHW on CPU (measured:
        # 35 vs 87 us per 28x28 image, 1 thread); the same weights, only their layout differs.
        self.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of one item's stored input: the frozen part's output, or the image as the network takes it."""
        if self.frozen:
            return tuple(self.backbone.stored_shape)
        c, s = self.cfg.channels, self.cfg.image_size
        return (s, s) if c == 1 else (s, s, c)

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.frozen else np.uint8)

    def feature_spec(self) -> dict | None:
        """What a shard keeps per item for this network (its meta ``features``); None: the blob is the input."""
        if not self.frozen:
            return None
        spec = {"backbone": self.cfg.backbone, "cut": self.backbone.cut, "feature_shape": list(self.stored_shape),
                "dtype": self.stored_dtype.name}
        size = getattr(self.backbone, "input_size", None)  # the pooled feature has one shape at every input size
        return {**spec, "input_size": int(size)} if size else spec

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, H, W[, C]) -> the stored input: the images themselves (no copy) for a backbone trained
        end to end, the frozen part's output (float16) for a frozen one."""
        if not self.frozen:
            return images
        return self.backbone.prepare(np.asarray(images))

    def _stored(self, batch: np.ndarray) -> np.ndarray:
        # uint8 is never a frozen network's stored input (float16 is): images given where one is expected are
        # prepared first, so a caller holding images (a probe, a test) gets the same codes as through the store
        return self.prepare(batch) if self.frozen and batch.dtype == np.uint8 else batch

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """A batch as the store keeps it for this network -> the tensor :meth:`forward` takes."""
        batch = self._stored(np.asarray(batch))
        if self.frozen:
            return torch.from_numpy(np.ascontiguousarray(batch)).float()
        return images_to_tensor(batch, self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """u = tanh(F(x)), shape (n, bits); ``x`` a stored-input tensor (:meth:`to_tensor`)."""
        if self.frozen:
            return torch.tanh(self.head(self.backbone.tail(x)))
        return torch.tanh(self.head(self.backbone(x)))

    @torch.inference_mode()
    def encode_real(self, stored: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Stored inputs (:meth:`prepare`) -> the real-valued output u, (n, bits) float32."""
        stored = self._stored(np.asarray(stored))
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(stored), batch_size):
            x = self.to_tensor(stored[start:start + batch_size]).to(self.device)
            out.append(self(x).float().cpu().numpy())
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.bits), np.float32)

    def encode(self, stored: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Stored inputs -> packed codes (n, bits/8) uint8."""
        return pack_signs(self.encode_real(stored, batch_size))

    def encode_images(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 images -> packed codes, through :meth:`prepare` (the query by photo, the ingest path)."""
        return self.encode(self.prepare(images), batch_size)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"config": asdict(self.cfg), "state": state}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, device: str | torch.device = "cpu") -> "HashNet":
        """The network :meth:`to_bytes` saved, its backbone built by the builder registered under its config's name."""
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        net = cls(HashNetConfig(**blob["config"]))
        net.load_state_dict(blob["state"])
        return net.to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without CUDA is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev
