"""Compression-aware training: train the dense network toward low rank, then truncate.

Alvarez and Salzmann (2017) add a nuclear-norm penalty ``sum_l tau_l ||W_l||_*`` to the
training loss, where ``W_l`` is layer ``l``'s weight matricized as ``out x in*kh*kw`` (per
group), and minimise it by proximal stochastic gradient: after an SGD step of size ``lr``,
the proximal operator of ``lr * tau_l * ||.||_*`` shrinks every singular value,

    W_l  <-  U max(S - lr * tau_l, 0) V^T,

so directions the loss does not defend reach exactly zero and the trained weights have low
rank. A truncation afterwards (``plan_by_rule(trained, "energy", keep=0.99)``, then
``compress``) then costs little accuracy.

The threshold's scale
---------------------
``tau_l = tau * sqrt(N_l / N_mean)``: ``N_l`` is layer ``l``'s number of weights and
``N_mean`` the mean over the regularised layers, so ``tau`` is the threshold of a layer of
average size, and a layer with four times the weights gets twice the threshold. The square
root of the size is how Alvarez and Salzmann (2016) weigh the penalty of a group of
parameters; it pushes the large layers, which hold the parameters, harder than the small
ones (a classifier with 10 outputs has little to gain). When the proximal step runs only
every ``prox_every`` steps, its threshold is ``prox_every * lr * tau_l``, so that ``tau``
means the same penalty whatever ``prox_every``.

Adam is refused: it scales each weight's step by its own running gradient size, so the
update is no longer a gradient step of size ``lr`` and ``lr * tau_l`` no longer matches it.

References
----------
Alvarez and Salzmann, "Compression-aware training of deep networks", NeurIPS 2017.
Alvarez and Salzmann, "Learning the number of neurons in deep networks", NeurIPS 2016.
Parikh and Boyd, "Proximal algorithms", Foundations and Trends in Optimization 2014
(singular value thresholding is the proximal operator of the nuclear norm).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from . import linalg
from .rules import check_layers, numerical_rank
from .spectra import Spectrum
from .train import History, train

__all__ = ["layer_taus", "lowrank_train", "proximal_step", "shrink_singular_values"]


def shrink_singular_values(mat: torch.Tensor, threshold: float) -> torch.Tensor:
    """``U max(S - threshold, 0) V^T`` of each matrix of a ``(..., m, n)`` batch, in float64.

    Computed from the eigendecomposition of the smaller Gram matrix (about three times faster
    than an SVD of a 1024 x 1024 weight): with ``W^T W = V diag(s^2) V^T``, the result is
    ``W V diag(max(s - t, 0) / s) V^T``. Values at or below the threshold are dropped, so no
    division by a small singular value ever matters.
    """
    w = mat.to(torch.float64)
    m, n = w.shape[-2:]
    tall = n <= m
    gram = w.transpose(-1, -2) @ w if tall else w @ w.transpose(-1, -2)
    vals, vecs = torch.linalg.eigh(gram)
    s = vals.clamp_min(0.0).sqrt()
    keep = s > threshold
    scale = torch.where(keep, (s - threshold) / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    proj = (vecs * scale.unsqueeze(-2)) @ vecs.transpose(-1, -2)
    return w @ proj if tall else proj @ w


@torch.no_grad()
def proximal_step(layer: nn.Module, threshold: float) -> None:
    """Shrink every singular value of ``layer``'s matricized weight by ``threshold``, in place.

    The weight is ``out x in*kh*kw`` per group (what ``svd`` truncates). This is the proximal
    operator of ``threshold * ||W||_*`` (Parikh and Boyd 2014); ``threshold=0`` leaves the
    weight untouched (bit for bit).
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number >= 0; got {threshold!r}")
    if threshold == 0:
        return
    w = layer.weight
    g = linalg.groups_of(layer)
    mat = w.detach().reshape(g, w.shape[0] // g, -1)
    w.copy_(shrink_singular_values(mat, threshold).reshape(w.shape).to(w.dtype))


def weight_spectrum(layer: nn.Module, name: str = "") -> Spectrum:
    """The ``out`` spectrum of ``layer``'s weight from the float64 Gram matrix's eigenvalues.

    What :func:`tensorscope.spectra.layer_spectrum` gives (up to float64 rounding, ~1e-8 of the
    largest value), several times faster for a weight that changes every epoch and is
    therefore never in the factor cache.
    """
    w = layer.weight.detach()
    g = linalg.groups_of(layer)
    mat = w.reshape(g, w.shape[0] // g, -1).to(torch.float64)
    m, n = mat.shape[-2:]
    gram = mat.transpose(-1, -2) @ mat if n <= m else mat @ mat.transpose(-1, -2)
    values = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0).sqrt()
    return Spectrum(name, "out", values.numpy(), (m, n))


def layer_taus(model: nn.Module, names: Iterable[str], tau: float) -> dict[str, float]:
    """Each layer's threshold weight: ``tau * sqrt(N_l / N_mean)`` (see the module's docstring)."""
    modules = dict(model.named_modules())
    sizes = {n: modules[n].weight.numel() for n in names}
    if not sizes:
        return {}
    mean = sum(sizes.values()) / len(sizes)
    return {n: float(tau) * math.sqrt(s / mean) for n, s in sizes.items()}


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0; got {tau!r}")
    return float(tau)


def lowrank_train(
    model: nn.Module,
    data: Any,
    *,
    tau: float,
    layers: Iterable[str] | None = None,
    prox_every: int = 1,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    teacher: nn.Module | None = None,
    val_data: Any = None,
    energy: float = 0.99,
    progress: Any = False,
) -> tuple[nn.Module, History]:
    """Train a copy of ``model`` with SGD toward low-rank weights (Alvarez and Salzmann 2017).

    :func:`tensorscope.train` with SGD; every ``prox_every`` steps each chosen layer's weight
    (``out x in*kh*kw``, per group) becomes ``U max(S - prox_every * lr * tau_l, 0) V^T``, with
    ``tau_l = tau * sqrt(N_l / N_mean)`` (``N_l``: the layer's weights, ``N_mean``: their mean
    over the chosen layers). Then truncate::

        trained, history = ts.lowrank_train(model, loader, tau=0.03, epochs=5, lr=0.05)
        small = ts.compress(trained, ts.plan_by_rule(trained, "energy", keep=0.99, methods="svd"))

    Parameters
    ----------
    model : nn.Module
        Not modified.
    data, val_data, teacher, epochs, lr, momentum, weight_decay, progress
        As for :func:`tensorscope.train` (``lr`` is also the proximal step's scale).
    tau : float >= 0
        The penalty's weight for a layer of average size (0: plain SGD).
    layers : names, optional
        The layers to regularise (default: every decomposable layer).
    prox_every : int
        Steps between proximal steps.
    optimizer : "sgd"
        Only SGD: Adam's per-weight step sizes break the threshold's scale (ValueError).
    energy : float
        The energy whose rank the history records per epoch.

    Returns
    -------
    (nn.Module, History)
        The trained copy, and one record per epoch (epoch 0: the start) whose ``info`` holds
        each layer's rank at ``energy`` of its energy (``energy_rank.<layer>``), its exact rank
        (``rank.<layer>``, zero singular values left out) and its singular values
        (``singular_values``: arrays, left out of ``to_frame()``). ``History.meta`` holds
        ``tau_l`` per layer.

    Raises
    ------
    ValueError
        ``tau`` negative or not finite, ``optimizer`` other than SGD, a bad ``prox_every``.
    PlanError
        An unknown layer (with close matches) or one that cannot be decomposed.
    DataError
        Batches without labels and no ``teacher``.
    """
    tau = _check_tau(tau)
    if str(optimizer).lower() != "sgd":
        raise ValueError(
            f"lowrank_train trains with SGD only; got optimizer={optimizer!r}. The proximal step shrinks "
            "singular values by lr * tau_l, which matches a gradient step of size lr; Adam's per-weight step "
            "sizes do not, and would make the threshold's scale meaningless")
    if isinstance(prox_every, bool) or not isinstance(prox_every, numbers.Integral) or prox_every < 1:
        raise ValueError(f"prox_every must be a positive integer; got {prox_every!r}")
    if not (isinstance(energy, numbers.Real) and 0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
    names = check_layers(model, layers)
    taus = layer_taus(model, names, tau)
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number; got {lr!r}")

    def prox(student: nn.Module, step: int) -> None:
        if step % prox_every:
            return
        for n in names:
            proximal_step(student.get_submodule(n), prox_every * lr * taus[n])

    def ranks(student: nn.Module, epoch: int) -> dict[str, Any]:
        specs = {n: weight_spectrum(student.get_submodule(n), n) for n in names}
        return {"energy_rank": {n: s.rank_for_energy(energy) for n, s in specs.items()},
                "rank": {n: numerical_rank(s) for n, s in specs.items()},
                "singular_values": {n: np.asarray(s.values) for n, s in specs.items()}}

    trained, history = train(model, data, epochs=epochs, optimizer="sgd", lr=lr, momentum=momentum,
                             weight_decay=weight_decay, teacher=teacher, val_data=val_data,
                             step_hook=prox if tau > 0 else None, epoch_hook=ranks, progress=progress)
    history.meta.update({"tau": tau, "tau_l": dict(taus), "prox_every": prox_every, "energy": energy,
                         "layers": list(names)})
    return trained, history
