"""Getting back what compression lost: fine-tuning, layer-wise refinement, iterative compression.

- :func:`finetune` trains the compressed model briefly: cross-entropy with labels,
  distillation from the original model (``teacher``) without them (or both), early stop on
  a held-out part of the data.
- :func:`refine_layerwise` fits each factorized layer to the original layer's outputs on
  calibration inputs (the data-reconstruction idea of Su et al.): no backward pass through
  the whole network, one small least-squares problem per layer.
- :func:`iterative` compresses a little, recovers, compresses again (Gusak et al. 2019,
  MUSCO), returning the history of each stage.

References
----------
Hinton, Vinyals and Dean, "Distilling the knowledge in a neural network", 2015. Su et al.,
"Tensorial neural networks" (arXiv 1805.10352). Gusak et al., "Automated multi-stage
compression of neural networks", ICCVW 2019.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import forward, iter_batches, output_tensor, split_batch
from .densify import dense_weight  # the one implementation (probing); re-exported here
from .errors import DataError
from .layers import FactorizedLayer
from .progress import Progress


def _frozen_norm_layers(model: nn.Module) -> None:
    """Keep normalisation statistics fixed: a few calibration batches would only skew them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _loss(out: torch.Tensor, target: torch.Tensor | None, teacher_out: torch.Tensor | None,
          temperature: float, label_weight: float) -> torch.Tensor:
    terms = []
    if target is not None:
        if target.dtype in (torch.int64, torch.int32) and out.dim() >= 2:
            terms.append((label_weight if teacher_out is not None else 1.0,
                          F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100)))
        else:
            terms.append((label_weight if teacher_out is not None else 1.0, F.mse_loss(out, target.to(out.dtype))))
    if teacher_out is not None:
        w = 1.0 - label_weight if target is not None else 1.0
        if out.dim() == 2:  # class scores: match the softened distributions
            t = temperature
            kd = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(teacher_out / t, -1), log_target=True,
                          reduction="batchmean") * t * t
        else:  # hidden states, token logits: match the outputs themselves
            kd = F.mse_loss(out, teacher_out)
        terms.append((w, kd))
    return sum(w * l for w, l in terms)


@torch.no_grad()
def _held_out_loss(model, teacher, batches, temperature, label_weight) -> float:
    total, n = 0.0, 0
    for b in batches:
        sb = split_batch(b)
        out = output_tensor(model(*sb.args, **sb.kwargs))
        t = output_tensor(teacher(*sb.args, **sb.kwargs)) if teacher is not None else None
        total += float(_loss(out, sb.target, t, temperature, label_weight)) * sb.size
        n += sb.size
    return total / max(n, 1)


#: Adam's step size for recovery (see :func:`finetune`)
DEFAULT_LR = 1e-4


def finetune(
    model: nn.Module,
    data: Any,
    *,
    teacher: nn.Module | None = None,
    steps: int = 200,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.0,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    val_data: Any = None,
    eval_every: int = 25,
    patience: int = 4,
    progress: Any = False,
) -> nn.Module:
    """Train a copy of ``model`` briefly and return it (``model`` itself is not modified).

    With labels and no teacher: cross-entropy. With a teacher and no labels: distillation
    (KL of temperature-softened outputs for ``(N, C)`` scores, MSE otherwise). With both:
    ``label_weight`` mixes them. Early stop: every ``eval_every`` steps the loss on
    ``val_data`` (default: the last batch of ``data``, held out from training) is checked,
    and training stops after ``patience`` checks without improvement, restoring the best.
    BatchNorm statistics stay fixed.

    The default ``lr`` is small on purpose: a compressed model starts close to its teacher,
    and Adam at 1e-3 first moves it away (measured on both built-in networks: the held-out
    loss rose and early stopping restored the starting weights). A warning says when no
    step improved on the start.
    """
    batches = list(iter_batches(data))
    if not batches:
        raise DataError("finetune needs at least one batch of data")
    if val_data is None and len(batches) > 1:
        train_batches, val_batches = batches[:-1], batches[-1:]
    else:
        train_batches = batches
        val_batches = list(iter_batches(val_data)) if val_data is not None else batches[-1:]
    if teacher is None and split_batch(train_batches[0]).target is None:
        raise DataError("finetune needs labels in the batches or a teacher model to distil from")
    student = copy.deepcopy(model)
    student.train()
    _frozen_norm_layers(student)
    if teacher is not None:
        teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    best = _held_out_loss(student.eval(), teacher, val_batches, temperature, label_weight)
    student.train()
    _frozen_norm_layers(student)
    best_state = initial_state = copy.deepcopy(student.state_dict())
    since_best = 0
    step = 0
    cycle = itertools.cycle(train_batches)
    with Progress(progress, total=steps, desc="fine-tuning") as bar:
        for step in range(1, steps + 1):
            sb = split_batch(next(cycle))
            with torch.no_grad():
                t = output_tensor(teacher(*sb.args, **sb.kwargs)) if teacher is not None else None
            out = output_tensor(student(*sb.args, **sb.kwargs))
            loss = _loss(out, sb.target, t, temperature, label_weight)
            if not torch.isfinite(loss):
                break  # diverged: keep the best state so far
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_message(f"loss {float(loss.detach()):.4f}")
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                val = _held_out_loss(student.eval(), teacher, val_batches, temperature, label_weight)
                student.train()
                _frozen_norm_layers(student)
                if val < best - 1e-6:
                    best, since_best = val, 0
                    best_state = copy.deepcopy(student.state_dict())
                else:
                    since_best += 1
                    if since_best >= patience:
                        break
    if best_state is initial_state:
        warnings.warn(
            f"fine-tuning did not improve the held-out loss in {step} steps (lr={lr:g}); the starting "
            "weights are returned. Try a smaller lr, more steps or more data.", stacklevel=2)
    student.load_state_dict(best_state)
    return student.eval()


# ---- layer-wise refinement ----------------------------------------------------------------


def _capture(model: nn.Module, name: str, batches: list, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs of layer ``name`` of ``model`` over ``batches`` (at most ``max_rows`` samples)."""
    layer = model.get_submodule(name)
    xs, ys = [], []
    rows = 0

    def hook(mod, args, out):
        xs.append(args[0].detach())
        ys.append(out.detach())

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, b)
                rows += xs[-1].shape[0] if xs else 0
                if rows >= max_rows:
                    break
    finally:
        h.remove()
    return torch.cat(xs)[:max_rows], torch.cat(ys)[:max_rows]


def refine_layerwise(
    model: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    max_batches: int | None = 8,
    max_rows: int = 4096,
    sequential: bool = True,
    progress: Any = False,
) -> nn.Module:
    """Fit each factorized layer of a copy of ``model`` to the teacher's layer, in network order.

    For every :class:`FactorizedLayer`, the chain is trained with Adam (relative MSE) to
    produce what the original layer (same name in ``teacher``) produces in the teacher.
    With ``sequential`` (default) the chain is fed the inputs it sees in the *compressed*
    network, earlier layers already refined, so each layer also corrects the error that
    reaches it from before; otherwise the teacher's own inputs (which a data-aware
    factorization has already fitted exactly, so that alone changes little). Only one
    small layer is in the graph at a time; a layer never ends worse than it started.
    Returns the refined copy.
    """
    batches = list(iter_batches(data, max_batches=max_batches))
    if not batches:
        raise DataError("refine_layerwise needs at least one batch of data")
    student = copy.deepcopy(model).eval()
    teacher = teacher.eval()
    names = [n for n, m in student.named_modules() if isinstance(m, FactorizedLayer)]
    with Progress(progress, total=len(names), desc="layer-wise refinement") as bar:
        for name in names:
            bar.set_message(name)
            x_t, y = _capture(teacher, name, batches, max_rows)
            x = _capture(student, name, batches, max_rows)[0] if sequential else x_t
            chain = student.get_submodule(name)
            chain.train()
            opt = torch.optim.Adam(chain.parameters(), lr=lr)
            scale = y.pow(2).mean().clamp_min(1e-12)
            with torch.no_grad():
                best = float((chain(x) - y).pow(2).mean() / scale)
            best_state = copy.deepcopy(chain.state_dict())
            for _ in range(steps):
                loss = (chain(x) - y).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    now = float((chain(x) - y).pow(2).mean() / scale)
                if now < best:
                    best, best_state = now, copy.deepcopy(chain.state_dict())
            chain.load_state_dict(best_state)  # never worse than the starting factors
            chain.eval()
            bar.update(1)
    return student


# ---- iterative compression ----------------------------------------------------------------


def densify(compressed: nn.Module, original: nn.Module) -> nn.Module:
    """The original architecture carrying the weights the compressed model computes."""
    dense = copy.deepcopy(original)
    for name, m in compressed.named_modules():
        if isinstance(m, FactorizedLayer):
            src = dense.get_submodule(name)
            src.weight.data = dense_weight(m, src).to(src.weight.dtype)
            if src.bias is not None:
                last_bias = [mm.bias for mm in m.modules() if getattr(mm, "bias", None) is not None]
                if last_bias:
                    src.bias.data = last_bias[-1].detach().clone()
    return dense


@dataclass
class Stage:
    keep: float
    params: int
    before: dict[str, float]
    after: dict[str, float]
    plan: Any = field(repr=False, default=None)


def iterative(
    model: nn.Module,
    data: Any,
    *,
    keep: float,
    steps: int = 3,
    finetune_steps: int = 100,
    methods: Sequence[str] | str = "auto",
    data_aware: bool = True,
    val_data: Any = None,
    lr: float | None = None,
    progress: Any = False,
) -> tuple[nn.Module, list[Stage]]:
    """Compress in ``steps`` stages down to ``keep`` of the parameters, recovering after each.

    Stage ``i`` keeps ``keep ** (i / steps)`` of the parameters: the planner allocates ranks
    on the current (recovered) weights, the model is compressed, quality is measured, the
    model is fine-tuned by distillation from the original, and quality is measured again.
    Returns the final compressed model and the history of stages.
    """
    from .budget import plan_for_budget
    from .evaluate import evaluate
    from .inventory import count_params
    from .surgery import compress

    if not (0.0 < keep <= 1.0) or steps < 1:
        raise ValueError(f"keep must be in (0, 1] and steps >= 1; got keep={keep!r}, steps={steps!r}")
    evaluation = val_data if val_data is not None else data
    current = copy.deepcopy(model).eval()
    history: list[Stage] = []
    small = current
    with Progress(progress, total=steps, desc="iterative compression") as bar:
        for i in range(1, steps + 1):
            k = keep ** (i / steps)
            bar.set_message(f"stage {i}: keep {k:.1%}")
            plan = plan_for_budget(current, k, methods=methods, data=data if data_aware else None)
            small = compress(current, plan, data=data if data_aware else None)
            before = evaluate(small, evaluation, reference=model)
            small = finetune(small, data, teacher=model, steps=finetune_steps, lr=DEFAULT_LR if lr is None else lr,
                             val_data=val_data)
            after = evaluate(small, evaluation, reference=model)
            history.append(Stage(k, count_params(small), before, after, plan))
            if i < steps:
                current = densify(small, current)
            bar.update(1)
    return small, history
