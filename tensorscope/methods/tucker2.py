"""Tucker-2 of a conv kernel over its two channel modes: 1x1, kh x kw core, 1x1.

``W[o, i, :, :] ~ sum_ab U_out[o, a] C[a, b, :, :] U_in[i, b]``: the layer becomes a 1x1 conv
from in to r_in channels, the kh x kw core from r_in to r_out (with the layer's stride,
padding and dilation) and a 1x1 conv from r_out to out with the bias. The rank is
``[r_out, r_in]`` in the order of the weight's own dimensions, as tensorly's
``partial_tucker`` takes it.

The factors start from the HOSVD, computed once per layer from the eigendecompositions of
the two unfoldings' Gram matrices, so every rank is a truncation. What ``compress`` builds
adds HOOI sweeps computed the same way (two by default; ``options["sweeps"]``), which bring
the error to within about 1% of a converged HOOI at a fraction of its cost; a live preview
uses the plain truncation (``refine=False``).

References
----------
Kim et al., "Compression of deep convolutional neural networks for fast and low power
mobile applications", ICLR 2016. De Lathauwer et al., "On the best rank-1 and rank-(R1,...,RN)
approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 2000 (HOOI).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import linalg
from .._cache import factor_cache, fingerprint
from ..errors import PlanError, RankError
from ..layers import CHAIN, FactorizedLayer
from .base import (
    Factors,
    LayerGeometry,
    Method,
    Option,
    RankAxis,
    Tradeoff,
    check_finite,
    per_sample_flops,
    resolve_int_rank,
)
from .registry import register_method

DEFAULT_SWEEPS = 1  # within 1% of full HOOI on random and trained kernels (FINDINGS.md), at a fraction of its cost


def _top(vecs: torch.Tensor, r: int) -> torch.Tensor:
    return vecs[..., :r]


def hooi_sweeps(w: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, sweeps: int):
    """Alternate the two channel factors, each the top eigenvectors of a projected Gram.

    ``w`` is ``(g, o, i, kh, kw)`` float64; factors are ``(g, o, r_out)`` and ``(g, i, r_in)``.
    """
    r_out, r_in = u_out.shape[-1], u_in.shape[-1]
    for _ in range(sweeps):
        y = torch.einsum("goikl,gib->gobkl", w, u_in).reshape(w.shape[0], w.shape[1], -1)
        u_out = _top(linalg.gram_eig(y)[1], r_out)
        y = torch.einsum("goikl,goa->giakl", w, u_out).reshape(w.shape[0], w.shape[2], -1)
        u_in = _top(linalg.gram_eig(y)[1], r_in)
    return u_out, u_in


def tucker2_retained(layer: nn.Module) -> np.ndarray:
    """Energy ``E[a, b]`` kept by the HOSVD truncation at ranks (a+1, b+1), all pairs at once.

    The HOSVD core for every rank pair is a corner of one full core, so its energy is a 2-D
    cumulative sum of the full core's squared entries: no factorization per rank.
    """
    key = (fingerprint(layer.weight), linalg.groups_of(layer), "tucker2-energy")

    def compute():
        e = linalg.hosvd_core(layer).pow(2).sum(dim=(0, 3, 4))
        return e.cumsum(0).cumsum(1)

    return factor_cache.get(key, compute).numpy()


def whitened_tucker2_retained(layer: nn.Module, stats) -> np.ndarray:
    """:func:`tucker2_retained` of the kernel with its input mode whitened by the channel
    moment (``M = W x_in L^T``): the energy each rank pair's truncation keeps of the layer's
    output on the calibration data, as far as the channel moment tells it (input patches
    whose kernel offsets correlate make it approximate). Memoised in the statistics."""
    key = ("tucker2-energy", fingerprint(layer.weight), stats.ridge)
    if key not in stats._memo:
        w = linalg.grouped_weight(layer).to(torch.float64)
        m = torch.einsum("goikl,gij->gojkl", w, stats.whitener("channel"))
        g, o, i = m.shape[:3]
        u_out = linalg.gram_eig(m.reshape(g, o, -1))[1]
        u_in = linalg.gram_eig(m.transpose(1, 2).reshape(g, i, -1))[1]
        e = torch.einsum("goikl,goa,gib->gabkl", m, u_out, u_in).pow(2).sum(dim=(0, 3, 4))
        stats._memo[key] = e.cumsum(0).cumsum(1).numpy()
    return stats._memo[key]


def whitened_tucker2(layer: nn.Conv2d, rank, stats, sweeps: int = 2) -> Factors:
    """Tucker-2 of ``W`` with its input mode whitened by the channel second moment.

    With ``M = W x_1 L^T`` factorized as ``U_out, core, Q``, the first 1x1 conv is
    ``Q^T L^{-1}``: exact at full rank, and the input projection keeps what the data uses.
    """
    r_out, r_in = rank
    w = linalg.grouped_weight(layer).to(torch.float64)
    L = stats.whitener("channel")
    m = torch.einsum("goikl,gij->gojkl", w, L)
    g, o, i = m.shape[:3]
    u_out = linalg.gram_eig(m.reshape(g, o, -1))[1][..., :r_out]
    q = linalg.gram_eig(m.transpose(1, 2).reshape(g, i, -1))[1][..., :r_in]
    u_out, q = hooi_sweeps(m, u_out, q, sweeps)
    core = torch.einsum("goikl,goa,gib->gabkl", m, u_out, q)
    u_in = torch.linalg.solve_triangular(L.transpose(-1, -2), q, upper=True)  # L^{-T} Q
    return Factors("tucker2", (r_out, r_in), {"u_out": u_out, "core": core, "u_in": u_in})


class Tucker2Layer(FactorizedLayer):
    """The Tucker-2 chain (1x1 in->r_in, kxk core r_in->r_out, 1x1 r_out->out).

    Besides ``"chain"`` it runs as ``"fold_in"`` (the first 1x1 folded into the core: one kxk
    conv in->r_out, then the last 1x1), ``"fold_out"`` (the first 1x1, then one kxk conv
    r_in->out with the last 1x1 folded in) or ``"dense"`` (the whole kernel rebuilt). The
    folded kernels are formed from the parameters on each call, so the parameters and the
    function stay those of the chain; what changes is how many passes over the feature map
    the layer makes. A 1x1 step over a large, thin feature map costs memory traffic far
    beyond its FLOPs: folding it away is what makes the chain as fast as its FLOPs promise.
    A zero 1x1 (no bias) commutes with the core's padding, stride and dilation, which is
    why the folds are exact.
    """

    executions = (CHAIN, "fold_in", "fold_out", "dense")

    def available_executions(self) -> tuple[str, ...]:
        _, (_first, core, _last) = self.leading(3)
        return self.executions if core.groups == 1 else (CHAIN,)

    def run(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode not in ("fold_in", "fold_out", "dense"):
            return super().run(x, mode)
        lead, (first, core, last) = self.leading(3)
        for m in lead:
            x = m(x)
        u_in = first.weight[:, :, 0, 0]  # (r_in, in)
        u_out = last.weight[:, :, 0, 0]  # (out, r_out)
        if mode == "fold_in":
            return last(core._conv_forward(x, torch.einsum("abkl,bi->aikl", core.weight, u_in), None))
        if mode == "fold_out":
            return core._conv_forward(first(x), torch.einsum("oa,abkl->obkl", u_out, core.weight), last.bias)
        w = torch.einsum("obkl,bi->oikl", torch.einsum("oa,abkl->obkl", u_out, core.weight), u_in)
        return core._conv_forward(x, w, last.bias)


@register_method
class Tucker2(Method):
    name = "tucker2"
    kinds = ("conv2d",)
    description = "Tucker-2: 1x1, kxk core, 1x1; rank [r_out, r_in]"
    option_specs = {
        "sweeps": Option("int", 0, 10_000, "HOOI sweeps after the HOSVD (default 1)"),
        "execute": Option("choice", help="how the chain runs: 'chain' (three convs), 'fold_in'/'fold_out' (the "
                          "first/last 1x1 folded into the core on each call), 'dense' (the kernel rebuilt on each "
                          "call); same parameters; tensorscope.tune_execution measures and sets it",
                          choices=Tucker2Layer.executions),
    }
    error_curve = True
    uses_data = True
    rank_separator = "×"
    core_recompression = True

    def rank_axes(self, geom: LayerGeometry, options=None) -> tuple[RankAxis, ...]:
        mo, mi = self.max_rank(geom)
        return (
            RankAxis("r_out", "rank r_out (output channels)", 1, mo, max(1, mo // 4), unfolding="out",
                     truncates=True, help="channels of the core's output: the width of the last 1x1 conv's input"),
            RankAxis("r_in", "rank r_in (input channels)", 1, mi, max(1, mi // 4), unfolding="in",
                     truncates=True, help="channels of the core's input: the width of the first 1x1 conv's output"),
        )

    def tradeoff(self, layer: nn.Module, geom: LayerGeometry | None = None, stats=None, name: str = "") -> Tradeoff | None:
        """Every rank pair's HOSVD error from one energy table; with data, of the kernel
        whitened on its input mode (:func:`whitened_tucker2_retained`: an estimate, since the
        factors ``compress`` builds are refined and refit per rank)."""
        geom = geom or LayerGeometry.of(layer)
        if stats is not None:
            e = whitened_tucker2_retained(layer, stats)
            total = float(e[-1, -1])
        else:
            e = tucker2_retained(layer)
            total = float(linalg.grouped_weight(layer).to(torch.float64).pow(2).sum())
        mo, mi = e.shape
        a, b = np.meshgrid(np.arange(1, mo + 1), np.arange(1, mi + 1), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        errs = np.sqrt(np.clip(1.0 - e.reshape(-1) / total, 0, None)) if total > 0 else np.zeros(a.size)
        g, k = geom.groups, geom.khw
        params = a * b * g * k + b * geom.in_features + a * geom.out_features + (geom.out_features if geom.bias else 0)
        flops = None
        if geom.dense_flops is not None:
            p_in = geom.in_size[0] * geom.in_size[1]
            p_out = geom.positions
            flops = 2 * (p_in * b * geom.in_features + p_out * g * a * b * k + p_out * geom.out_features * a)
        ranks = list(zip(a.tolist(), b.tolist()))
        return Tradeoff(name, self.name, ranks, params, errs, flops, geom.dense_params, geom.dense_flops).pareto()

    def cheap_error(self, layer: nn.Module, rank, stats=None, options=None) -> float | None:
        """The HOSVD truncation's error from the energy table (refined factors do a little better;
        with data, an estimate from the whitened table)."""
        e = tucker2_retained(layer) if stats is None else whitened_tucker2_retained(layer, stats)
        total = float(e[-1, -1])  # the full core holds all of ||W||^2 (orthonormal bases)
        if total <= 0:
            return 0.0
        kept = float(e[rank[0] - 1, rank[1] - 1])
        return math.sqrt(max(0.0, 1.0 - kept / total))

    def max_rank(self, geom: LayerGeometry, options=None) -> tuple[int, int]:
        return (geom.out_features // geom.groups, geom.in_features // geom.groups)

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options=None) -> tuple[int, int]:
        mo, mi = self.max_rank(geom)
        if isinstance(rank, (int, float)) and not isinstance(rank, bool):
            if isinstance(rank, float):
                return (resolve_int_rank("tucker2", geom, rank, mo, "r_out"),
                        resolve_int_rank("tucker2", geom, rank, mi, "r_in"))
            # one integer: the same rank on both modes, capped by each mode's size
            r = resolve_int_rank("tucker2", geom, rank, max(mo, mi))
            return (min(r, mo), min(r, mi))
        if isinstance(rank, (list, tuple)) and len(rank) == 2:
            return (resolve_int_rank("tucker2", geom, rank[0], mo, "r_out"),
                    resolve_int_rank("tucker2", geom, rank[1], mi, "r_in"))
        raise RankError(
            f"tucker2: rank must be [r_out, r_in] (order of the weight's dimensions), one integer "
            f"for both, or a fraction in (0, 1]; got {rank!r} (max [{mo}, {mi}])"
        )

    def count_params(self, geom: LayerGeometry, rank, options=None) -> int:
        r_out, r_in = rank
        return (r_in * geom.in_features + geom.groups * r_out * r_in * geom.khw + geom.out_features * r_out
                + (geom.out_features if geom.bias else 0))

    def count_flops(self, geom: LayerGeometry, rank, options=None) -> int | None:
        """The three convs of the chain, or the form ``options["execute"]`` names (ungrouped
        layers only, as :class:`Tucker2Layer` runs them): a folded kernel is formed once per
        call, shared by the call's samples (:func:`~tensorscope.methods.base.per_sample_flops`).

        ``fold_in``: ``(r_out, r_in, k) x (r_in, in)``, then the k x k conv in -> r_out and the
        last 1x1; ``fold_out``: ``(out, r_out) x (r_out, r_in, k)``, the first 1x1, then the k x k
        conv r_in -> out; ``dense``: both products, then the dense conv.
        """
        if geom.in_size is None:
            return None
        r_out, r_in = rank
        c, o, khw = geom.in_features, geom.out_features, geom.khw
        p_in = geom.in_size[0] * geom.in_size[1]
        p_out = geom.positions
        first, last = 2 * p_in * r_in * c, 2 * p_out * o * r_out
        execute = (options or {}).get("execute", CHAIN)
        if geom.groups != 1 or execute == CHAIN:
            return first + 2 * p_out * geom.groups * r_out * r_in * khw + last
        fold_out = 2 * o * r_out * r_in * khw  # (out, r_out) x (r_out, r_in*k)
        if execute == "fold_in":
            return per_sample_flops(geom, 2 * r_out * r_in * khw * c, 2 * p_out * r_out * c * khw + last)
        if execute == "fold_out":
            return per_sample_flops(geom, fold_out, first + 2 * p_out * o * r_in * khw)
        if execute == "dense":
            return per_sample_flops(geom, fold_out + 2 * o * r_in * khw * c, geom.dense_flops)
        raise PlanError(f"tucker2: execute must be one of {', '.join(map(repr, Tucker2Layer.executions))}; "
                        f"got {execute!r}")

    def factorize(self, layer: nn.Module, rank, options=None, *, stats=None, refine=True) -> Factors:
        check_finite(layer)
        r_out, r_in = rank
        opts = dict(options or {})
        if stats is not None:
            return self._data_aware(layer, rank, opts, stats, refine)
        u_out = _top(linalg.mode_eig(layer, 0)[1], r_out)
        u_in = _top(linalg.mode_eig(layer, 1)[1], r_in)
        o, i = layer.out_channels // layer.groups, layer.in_channels // layer.groups
        full = r_out == o and r_in == i
        sweeps = int(opts.get("sweeps", DEFAULT_SWEEPS)) if refine and not full else 0
        if sweeps == 0:  # a truncation of the cached HOSVD: a slice of its core, no contraction
            core = linalg.hosvd_core(layer)[:, :r_out, :r_in].clone()
            return Factors("tucker2", (r_out, r_in), {"u_out": u_out, "core": core, "u_in": u_in})
        w = linalg.grouped_weight(layer).to(torch.float64)
        u_out, u_in = hooi_sweeps(w, u_out, u_in, sweeps)
        core = torch.einsum("goikl,goa,gib->gabkl", w, u_out, u_in)
        return Factors("tucker2", (r_out, r_in), {"u_out": u_out, "core": core, "u_in": u_in})

    def _data_aware(self, layer: nn.Module, rank, opts: dict, stats, refine: bool) -> Factors:
        """Least output error on the calibration data: two candidate projections (input mode
        whitened by the channel moment, and the plain HOSVD/HOOI one), each with its output
        factor refit by least squares against the layer's outputs; the better one wins.

        Whitening the channel mode alone ignores how patches correlate, so on some layers it
        is the plain projection with a refit output factor that reconstructs outputs best;
        choosing by the measured error means data never makes a layer worse on that data.
        """
        sweeps = int(opts.get("sweeps", DEFAULT_SWEEPS)) if refine else 0
        candidates = [whitened_tucker2(layer, rank, stats, sweeps=sweeps),
                      self.factorize(layer, rank, opts, refine=refine)]
        best, best_err = None, math.inf
        for f in candidates:
            t = f.tensors
            g = t["core"].shape[0]
            inner = torch.einsum("gabkl,gib->gaikl", t["core"].to(torch.float64), t["u_in"].to(torch.float64))
            u_out, err = linalg.refit_output(layer, stats, inner.reshape(g, rank[0], -1))
            if err < best_err:
                best_err = err
                best = Factors("tucker2", tuple(rank), {"u_out": u_out, "core": t["core"], "u_in": t["u_in"]})
        return best

    def recompress(self, layer: nn.Module, chain: nn.Module, rank, options=None) -> nn.Module:
        """Tucker-2 of the chain's core only, its new 1x1 factors multiplied into the old ones.

        With the chain ``L (1x1) . C (kxk) . F (1x1)`` at rank ``(R_out, R_in)`` and
        ``C ~ U_o C' U_i^T`` at ``rank = (r_out, r_in)`` (HOSVD and HOOI sweeps of the small
        core, ``options["sweeps"]``), the result is ``(L U_o) . C' . (U_i^T F)``: the shape of a
        plain ``tucker2`` chain at ``rank``, exact when ``rank`` is the chain's own (the core's
        factors are then square and orthogonal). MUSCO (Gusak et al. 2019) compresses this
        way stage after stage; the dense weight is never formed.
        """
        first, core, last = chain[0], chain[1], chain[2]
        geom = LayerGeometry.of(layer)
        old = tuple(int(r) for r in getattr(chain, "rank", (core.out_channels // core.groups,
                                                              core.in_channels // core.groups)))
        r_out, r_in = self.resolve_rank(geom, rank, options)
        if r_out > old[0] or r_in > old[1]:
            raise RankError(f"tucker2: core recompression lowers ranks only; the chain has rank "
                            f"{self.rank_text(old)}, asked for {self.rank_text((r_out, r_in))}")
        opts = {"sweeps": (options or {}).get("sweeps", DEFAULT_SWEEPS)}
        f = self.factorize(core, (r_out, r_in), opts).tensors  # u_out (g, R_out, r_out), u_in (g, R_in, r_in)
        g = geom.groups
        f_in = first.weight.detach().to(torch.float64).reshape(g, old[1], -1)  # (g, R_in, in/g): U_in^T
        l_out = last.weight.detach().to(torch.float64).reshape(g, -1, old[0])  # (g, out/g, R_out)
        merged = Factors("tucker2", (r_out, r_in), {
            "u_out": l_out @ f["u_out"].to(torch.float64),
            "core": f["core"],
            "u_in": f_in.transpose(1, 2) @ f["u_in"].to(torch.float64),
        })
        built = self.build(layer, merged)
        if last.bias is not None:
            built[2].bias.data.copy_(last.bias.detach())
        built.options = dict(getattr(chain, "options", {}) or {})
        built.train(chain.training)
        return built.to(device=first.weight.device, dtype=first.weight.dtype)

    def empty_factors(self, geom: LayerGeometry, rank, options=None) -> Factors:
        g, (r_out, r_in) = geom.groups, rank
        kh, kw = geom.kernel_size
        return Factors("tucker2", rank, {
            "u_out": torch.zeros(g, geom.out_features // g, r_out),
            "core": torch.zeros(g, r_out, r_in, kh, kw),
            "u_in": torch.zeros(g, geom.in_features // g, r_in),
        })

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        t = factors.tensors
        w = torch.einsum("goa,gabkl,gib->goikl", t["u_out"], t["core"], t["u_in"])
        return w.reshape(layer.weight.shape).to(layer.weight.dtype)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        t = factors.tensors
        r_out, r_in = factors.rank
        g = layer.groups
        kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        bias = layer.bias is not None
        first = nn.Conv2d(layer.in_channels, g * r_in, 1, groups=g, bias=False, **kw)
        core = nn.Conv2d(
            g * r_in, g * r_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=g, bias=False, padding_mode=layer.padding_mode, **kw,
        )
        last = nn.Conv2d(g * r_out, layer.out_channels, 1, groups=g, bias=bias, **kw)
        first.weight.data.copy_(t["u_in"].transpose(1, 2).reshape(first.weight.shape))
        core.weight.data.copy_(t["core"].reshape(core.weight.shape))
        last.weight.data.copy_(t["u_out"].reshape(last.weight.shape))
        if bias:
            last.bias.data.copy_(layer.bias.detach())
        return Tucker2Layer(first, core, last, method="tucker2", rank=(r_out, r_in), source="Conv2d")
