"""What a layer's ``forward`` really computes, checked once on a probe input.

tensorscope replaces a layer by a chain built from its weight and its declared geometry
(``stride``, ``padding``, ...). Ports of TensorFlow networks (EfficientNet, MobileNet ports)
subclass ``nn.Conv2d`` with ``padding=0`` and pad inside ``forward`` ("same" padding); a
chain built from ``layer.padding`` would silently drop that padding. So every subclass
whose ``forward`` differs from its base class's, and every layer with forward hooks, is run
once on a small random input and compared with the plain ``F.linear``/``F.conv2d`` of its
own weights:

- it matches: the layer is what its class says (``Behaviour("plain")``);
- it matches a zero padding of the input followed by the unpadded convolution, either a
  fixed padding or TensorFlow's input-size-dependent "same" padding: the chain gets an
  :class:`InputPadding` in front, exact at full rank (``Behaviour("padded")``);
- anything else: the layer is refused with the reason (``Behaviour("refused")``), listed by
  ``inspect`` and named by every plan that asks for it. Never silently wrong.

An ``nn.Conv1d`` is seen as a Conv2d of height 1 (:class:`tensorscope.views.Conv1dView`);
the view is checked by running the layer itself (its hooks, its class's ``forward``, e.g. a
causal conv that pads on the left) on ``(1, C, L)`` probes, and a padding it finds is the
view's ``(left, right, 0, 0)``.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .views import Conv1dView, hooked

__all__ = ["Behaviour", "InputPadding", "behaviour", "same_padding"]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one spatial dimension: (before, after), after >= before."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class InputPadding(nn.Module):
    """Zero padding applied to a factorized conv chain's input, as the replaced layer did.

    ``pads`` is ``(left, right, top, bottom)`` (fixed), or ``None`` for TensorFlow's "same"
    padding computed from each input's size (``kernel``, ``stride``, ``dilation`` given).
    Plain torch ops only: TorchScript and ``torch.export`` run it without tensorscope.
    """

    def __init__(self, pads: tuple[int, int, int, int] | None = None, kernel: tuple[int, int] = (1, 1),
                 stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)):
        super().__init__()
        self.fixed = pads is not None
        self.pads = list(pads) if pads is not None else [0, 0, 0, 0]
        self.kernel, self.stride, self.dilation = list(kernel), list(stride), list(dilation)

    def forward(self, x: Tensor) -> Tensor:
        if self.fixed:
            return F.pad(x, self.pads)
        ih, iw = x.shape[-2], x.shape[-1]
        th = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + (self.kernel[0] - 1) * self.dilation[0] + 1 - ih, 0)
        tw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + (self.kernel[1] - 1) * self.dilation[1] + 1 - iw, 0)
        return F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The spatial size after padding an input of ``size``."""
        if self.fixed:
            return size[0] + self.pads[2] + self.pads[3], size[1] + self.pads[0] + self.pads[1]
        ph = same_padding(size[0], self.kernel[0], self.stride[0], self.dilation[0])
        pw = same_padding(size[1], self.kernel[1], self.stride[1], self.dilation[1])
        return size[0] + sum(ph), size[1] + sum(pw)

    def extra_repr(self) -> str:
        return f"pads={self.pads}" if self.fixed else f"same, kernel={self.kernel}, stride={self.stride}"


@dataclass(frozen=True)
class Behaviour:
    """What a layer's forward computes: ``kind`` is "plain", "padded" or "refused"."""

    kind: str
    pads: tuple[int, int, int, int] | None = None  # "padded": fixed (left, right, top, bottom)
    same: bool = False  # "padded": TensorFlow "same" padding, from the input size
    reason: str | None = None  # "refused": why

    def padding_module(self, layer: nn.Conv2d) -> InputPadding | None:
        if self.kind != "padded":
            return None
        if self.same:
            return InputPadding(None, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation))
        return InputPadding(self.pads)


_PLAIN = Behaviour("plain")
_MEMO: "weakref.WeakKeyDictionary[nn.Module, Behaviour]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _overrides(module: nn.Module) -> bool:
    if isinstance(module, Conv1dView):  # what runs is the nn.Conv1d itself
        cls = type(module.source)
        return cls.forward is not nn.Conv1d.forward or cls._conv_forward is not nn.Conv1d._conv_forward
    cls = type(module)
    if isinstance(module, nn.Conv2d):
        return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
    return cls.forward is not nn.Linear.forward


def behaviour(module: nn.Module) -> Behaviour:
    """What ``module`` (an ``nn.Linear`` or ``nn.Conv2d``, possibly a subclass) computes.

    Exact ``nn.Linear``/``nn.Conv2d`` instances without hooks are plain without running
    anything; others are probed once (memoised per module). The view of an ``nn.Conv1d`` is
    what the layer itself computes.
    """
    real = hooked(module) if isinstance(module, Conv1dView) else module
    hooks = len(real._forward_hooks) + len(real._forward_pre_hooks)
    if hooks:
        return Behaviour("refused", reason=(
            f"it has {hooks} forward hook(s) registered, which change what it computes and which a factorized "
            "chain would not run; remove them (handle.remove()) before compressing"))
    if not _overrides(module):
        return _PLAIN
    with _LOCK:
        hit = _MEMO.get(real)
    if hit is None:
        hit = _probe(module)
        with _LOCK:
            _MEMO[real] = hit
    return hit


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.detach(), b.detach()
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool((a - b).abs().max() <= 64 * eps * (scale + 1.0) * max(1, b.shape[1]) ** 0.5)


def _probe(module: nn.Module) -> Behaviour:
    cls = type(hooked(module) if isinstance(module, Conv1dView) else module).__name__
    w = module.weight
    if w.device.type == "meta":
        return Behaviour("refused", reason=f"{cls} overrides forward and its weights are on the meta device, so "
                                           "what it computes cannot be checked; load its weights first")
    real = hooked(module) if isinstance(module, Conv1dView) else module
    was_training = real.training
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        real.eval()
        with torch.no_grad():
            if isinstance(module, nn.Conv2d):
                return _probe_conv(module, gen)
            x = torch.randn(3, module.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
            if _close(module(x), F.linear(x, w, module.bias)):
                return _PLAIN
    except Exception as e:  # a forward that fails on a random input cannot be checked
        return Behaviour("refused", reason=f"{cls}.forward failed on a probe input ({type(e).__name__}: {e}), so "
                                           "what it computes cannot be checked")
    finally:
        real.train(was_training)
    return Behaviour("refused", reason=(
        f"{cls}.forward computes something other than the linear map of its weight and bias (checked on a probe "
        "input), so a factorized chain would change the output; leave it dense"))


def _probe_conv(conv: nn.Conv2d, gen: torch.Generator) -> Behaviour:
    one_d = isinstance(conv, Conv1dView)
    cls = type(conv.source if one_d else conv).__name__
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    # three sizes, of different parities and remainders modulo the stride (a Conv1d's view: height 1)
    sizes = [(1 if one_d else eh + 2 * sh + 3 + k, ew + 2 * sw + 3 + k) for k in (0, 1, 3)]
    w, b = conv.weight, conv.bias

    def run(x: Tensor) -> Tensor:  # the layer that runs in the model, on the view's layout
        return conv.source(x.squeeze(-2)).unsqueeze(-2) if one_d else conv(x)

    plain, matches = True, []  # per probe size: does the declared conv match; which zero paddings do
    pad_only = conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not any(conv.padding)
    for h, wd in sizes:
        x = torch.randn(1, conv.in_channels, h, wd, generator=gen).to(device=w.device, dtype=w.dtype)
        y = run(x)
        plain = plain and _close(y, nn.Conv2d._conv_forward(conv, x, w, b))
        matches.append(_paddings(conv, x, y) if pad_only else set())
    if plain:
        return _PLAIN
    same = []
    for h, wd in sizes:
        top, bottom = same_padding(h, kh, sh, dh)
        left, right = same_padding(wd, kw, sw, dw)
        same.append((left, right, top, bottom))
    if all(p in m for p, m in zip(same, matches)):  # TensorFlow's "same" (also a static one at these sizes)
        return Behaviour("padded", same=True)
    common = set.intersection(*matches)
    if common:  # a fixed padding (a padding a size does not use shows up among several that match)
        return Behaviour("padded", pads=min(common, key=lambda p: (sum(p), p)))
    return Behaviour("refused", reason=(
        f"{cls}.forward computes something other than a convolution with its own stride, padding and dilation "
        "(checked on a probe input), and not a zero padding of the input before one; a factorized chain would "
        "change the output, so it is left dense"))


def _paddings(conv: nn.Conv2d, x: Tensor, y: Tensor) -> set[tuple[int, int, int, int]]:
    """Every zero padding (left, right, top, bottom) with which the unpadded conv gives ``y``."""
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    h, wd = x.shape[-2:]
    oh, ow = y.shape[-2:]

    def totals(size: int, out: int, ek: int, s: int) -> list[int]:
        return [t for t in range(0, 2 * ek + s) if (size + t - ek) // s + 1 == out and size + t >= ek]

    out: set[tuple[int, int, int, int]] = set()
    for th, tw in itertools.product(totals(h, oh, eh, sh), totals(wd, ow, ew, sw)):
        for top, left in itertools.product(range(th + 1), range(tw + 1)):
            pads = (left, tw - left, top, th - top)
            z = F.conv2d(F.pad(x, list(pads)), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
            if _close(y, z):
                out.add(pads)
    return out
