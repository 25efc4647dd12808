"""The dense weight a factorized layer computes, found by probing it (one implementation).

Used by :func:`tensorscope.recovery.dense_weight` (iterative compression, tests) and by the
explorer (a tensorscope checkpoint multiplied back out to its original architecture).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .forward_check import InputPadding
from .layers import FactorizedLayer

__all__ = ["probe_dense", "dense_weight"]


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return fallback


def probe_dense(module: nn.Module, template: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The dense weight and bias a factorized ``module`` computes, in ``template``'s layout.

    ``template`` is the dense ``nn.Linear`` or ``nn.Conv2d`` the module stands for (an
    ``nn.Conv1d``'s view, :func:`tensorscope.views.linear_view`, for its chain) (its
    geometry: features, kernel, stride, padding, dilation, groups). The module is treated as
    a black box that is affine in its input: identity rows for a Linear; for a Conv2d,
    one-hot inputs placed where one output position sees the whole kernel window, away from
    the padding (so any padding mode, ``"same"``/``"valid"`` and any chain of layers that
    reproduces the geometry work, fine-tuned factors included). The bias is the response to
    a zero input (None when ``template`` has none). The module is run in eval mode, its own
    training flags restored afterwards; results are on ``template``'s device and dtype.
    """
    dtype = template.weight.dtype
    out_device = template.weight.device
    dev = _device_of(module, out_device)
    if isinstance(module, nn.Sequential) and any(isinstance(m, InputPadding) for m in module):
        # the chain of a conv port that pads in its forward: the template is the unpadded conv
        module = nn.Sequential(*[m for m in module if not isinstance(m, InputPadding)])
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    if isinstance(module, FactorizedLayer):  # an nn.Conv1d's chain: probed in its template's (N, C, 1, L)
        module = module.forward_view
    try:
        with torch.no_grad():
            if isinstance(template, nn.Linear):
                zero = module(torch.zeros(1, template.in_features, dtype=dtype, device=dev))[0]
                eye = torch.eye(template.in_features, dtype=dtype, device=dev)
                w = (module(eye) - zero).t().contiguous()
                return w.to(out_device), (zero.clone().to(out_device) if template.bias is not None else None)
            if not isinstance(template, nn.Conv2d):
                raise TypeError(f"probe_dense needs an nn.Linear or nn.Conv2d template; got {type(template).__name__}")
            conv = template
            kh, kw = conv.kernel_size
            dh, dw = conv.dilation
            sh, sw = conv.stride
            if conv.padding == "same":
                ph, pw = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
            elif conv.padding == "valid":
                ph, pw = 0, 0
            else:
                ph, pw = conv.padding
            oy, ox = -(-ph // sh), -(-pw // sw)  # the first output position whose window is inside
            y0, x0 = oy * sh - ph, ox * sw - pw
            h, w_ = y0 + (kh - 1) * dh + 1, x0 + (kw - 1) * dw + 1
            if conv.padding == "same":  # "same" keeps the input size: the window must fit both sides
                h, w_ = h + ph, w_ + pw
            # reflect/circular padding needs an input larger than the padding; extra rows and
            # columns at the end move neither the chosen output position nor its window
            h, w_ = max(h, ph + 1), max(w_, pw + 1)
            cin = conv.in_channels
            n = cin * kh * kw
            x = torch.zeros(n, cin, h, w_, dtype=dtype, device=dev)
            idx = torch.arange(n, device=dev)
            c, ky, kx = idx // (kh * kw), (idx // kw) % kh, idx % kw
            x[idx, c, y0 + ky * dh, x0 + kx * dw] = 1.0
            zero = module(torch.zeros(1, cin, h, w_, dtype=dtype, device=dev))[0, :, oy, ox]
            resp = module(x)[:, :, oy, ox] - zero  # (cin*kh*kw, out)
            full = resp.t().reshape(conv.out_channels, cin, kh, kw)
            g = conv.groups
            if g > 1:  # keep each output's own group of input channels
                o_per, i_per = conv.out_channels // g, cin // g
                full = torch.cat([full[j * o_per:(j + 1) * o_per, j * i_per:(j + 1) * i_per] for j in range(g)])
            bias = zero.clone().to(out_device) if conv.bias is not None else None
            return full.contiguous().to(out_device), bias
    finally:
        for m, flag in flags:
            m.training = flag


def dense_weight(chain: nn.Module, source: nn.Module) -> Tensor:
    """The dense weight (no bias) a factorized ``chain`` computes, in ``source``'s layout."""
    return probe_dense(chain, source)[0]
