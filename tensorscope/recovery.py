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
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .budget import plan_for_budget
from .data import forward, iter_batches, output_tensor, split_batch
from .densify import dense_weight, probe_dense  # the one implementation (probing); re-exported here
from .errors import DataError, PlanError
from .evaluate import evaluate
from .inventory import count_flops, count_params
from .layers import FactorizedLayer, for_layer
from .views import layer_modules, linear_view, set_dense_weight
from .methods import LayerGeometry, get_method
from .plan import Plan
from .progress import Progress
from .rules import check_layers, check_min_rank, check_weakening, first_method, plan_by_rule, resolve_methods
from .surgery import PLAN_ATTR, compress, plan_of, set_submodule
from .train import History, task_loss


def _frozen_norm_layers(model: nn.Module) -> None:
    """Keep normalisation statistics fixed: a few calibration batches would only skew them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


_loss = task_loss  # the one implementation: tensorscope.train


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
    dropout: bool = False,
    trainable: str = "all",
    stop: Callable[[], bool] | None = None,
) -> nn.Module:
    """Train a copy of ``model`` briefly and return it (``model`` itself is not modified).

    With labels and no teacher: cross-entropy. With a teacher and no labels: distillation
    (KL of temperature-softened outputs for ``(N, C)`` scores, MSE otherwise). With both:
    ``label_weight`` mixes them. Early stop: every ``eval_every`` steps the loss on
    ``val_data`` (default: the last batch of ``data``, held out from training) is checked,
    and training stops after ``patience`` checks without improvement, restoring the best.
    BatchNorm statistics stay fixed.

    The student trains in eval mode: dropout and drop-connect stay off (``dropout=True``
    turns them on), since with few calibration samples their noise costs more than it
    regularises. ``trainable="factors"`` trains only the factorized layers' parameters (the
    rest of the network stays the teacher's), fewer parameters to overfit few samples with.

    The default ``lr`` is small on purpose: a compressed model starts close to its teacher,
    and Adam at 1e-3 first moves it away (measured on both built-in networks: the held-out
    loss rose and early stopping restored the starting weights). A warning says when no
    step improved on the start.

    ``data`` is a list of batches (or any iterable: it is read once and cycled), or a
    source of fresh batches, so that each step can see samples no earlier step saw (new
    random crops of the calibration images, say): a callable ``step -> batch``, called once
    per step with ``step`` = 1, 2, ..., ``steps``; or an iterator (a generator), one batch
    taken per step, training ending early when it runs out. A source needs ``val_data``
    (it has no last batch to hold out), which should be fixed batches the source does not
    produce.

    ``stop``: a callable checked before each step (a Stop button); when it returns True
    training ends there and the best weights so far are returned, as at an early stop.
    """
    source = callable(data) and not isinstance(data, nn.Module) or isinstance(data, Iterator)
    if source:
        if val_data is None:
            raise DataError("finetune with a callable or an iterator as data (fresh batches each step) needs "
                            "val_data=: fixed held-out batches for early stopping, not drawn from the source")
        val_batches = list(iter_batches(val_data))
        next_batch, more = _batch_source(data)
        first = next_batch(1)
        if first is None:
            raise DataError("finetune: the data iterator yielded no batch" if isinstance(data, Iterator) else
                            "finetune: data(1) returned None; a callable data source must return a batch each step")
        train_batches = [first]
    else:
        batches = list(iter_batches(data))
        if not batches:
            raise DataError("finetune needs at least one batch of data")
        if val_data is None and len(batches) > 1:
            train_batches, val_batches = batches[:-1], batches[-1:]
        else:
            train_batches = batches
            val_batches = list(iter_batches(val_data)) if val_data is not None else batches[-1:]
        cycle = itertools.cycle(train_batches)

        def next_batch(step):
            return next(cycle)

        def more():
            return True
    if not val_batches:
        raise DataError("finetune: val_data yielded no batch")
    if teacher is None and split_batch(train_batches[0]).target is None:
        raise DataError("finetune needs labels in the batches or a teacher model to distil from")
    if trainable not in ("all", "factors"):
        raise ValueError(f'trainable must be "all" or "factors"; got {trainable!r}')
    student = copy.deepcopy(model)
    _train_mode(student, dropout)
    if teacher is not None:
        teacher.eval()
    if trainable == "factors":
        keep = {id(p) for m in student.modules() if isinstance(m, FactorizedLayer) for p in m.parameters()}
        if not keep:
            raise DataError('finetune(trainable="factors") found no factorized layer in the model')
        frozen = [p for p in student.parameters() if id(p) not in keep and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    best = _held_out_loss(student.eval(), teacher, val_batches, temperature, label_weight)
    _train_mode(student, dropout)
    best_state = initial_state = copy.deepcopy(student.state_dict())
    since_best = 0
    step = 0
    stopped = False
    with Progress(progress, total=steps, desc="fine-tuning") as bar:
        for step in range(1, steps + 1):
            if stop is not None and stop():
                stopped, step = True, step - 1
                break
            batch = first if source and step == 1 else next_batch(step)
            if batch is None:  # the iterator ran out
                step -= 1
                break
            sb = split_batch(batch)
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
            if step % eval_every == 0 or step == steps or not more():  # the last step is always checked
                val = _held_out_loss(student.eval(), teacher, val_batches, temperature, label_weight)
                _train_mode(student, dropout)
                if val < best - 1e-6:
                    best, since_best = val, 0
                    best_state = copy.deepcopy(student.state_dict())
                else:
                    since_best += 1
                    if since_best >= patience:
                        break
    if best_state is initial_state and not stopped:
        warnings.warn(
            f"fine-tuning did not improve the held-out loss in {step} steps (lr={lr:g}); the starting "
            "weights are returned. Try a smaller lr, more steps or more data.", stacklevel=2)
    student.load_state_dict(best_state)
    if trainable == "factors":
        for p in frozen:
            p.requires_grad_(True)
    return student.eval()


def _batch_source(data: Any):
    """``(step -> batch, more)`` for a callable or an iterator of fresh batches: the batch is
    ``None`` once an iterator is exhausted; ``more()`` says whether another batch will come
    (it peeks one ahead, so that the last step of an iterator is checked on held-out data)."""
    if isinstance(data, Iterator):
        ahead: list = []

        def take(step):
            return ahead.pop() if ahead else next(data, None)

        def more():
            if not ahead:
                b = next(data, None)
                if b is None:
                    return False
                ahead.append(b)
            return True
        return take, more

    def call(step):
        batch = data(step)
        if batch is None:
            raise DataError(f"finetune: data({step}) returned None; a callable data source must return a batch "
                            "each step")
        return batch
    return call, lambda: True


def _train_mode(model: nn.Module, dropout: bool) -> None:
    """Training mode for :func:`finetune`: eval mode (no dropout, no drop-connect, fixed
    normalisation statistics) unless ``dropout``; then train mode with normalisation fixed."""
    if dropout:
        model.train()
        _frozen_norm_layers(model)
    else:
        model.eval()


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
    blocks: Sequence[str] | None = None,
    progress: Any = False,
) -> nn.Module:
    """Fit each factorized layer of a copy of ``model`` to the teacher's layer, in network order.

    With ``blocks`` (names of modules, e.g. residual blocks or stages): block by block in
    network order, all factorized layers inside one block train together so that the block's
    output (after its own nonlinearity, whatever its forward returns) matches the teacher's
    block; everything else in the block stays fixed (Su et al.'s sequential data
    reconstruction). A block's forward must take the previous module's output as its one
    positional input. A group's shared core (``joint_tucker``) trains with the block of any
    of its members, which moves the members in other blocks too.

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
    if blocks is not None:
        names = _check_blocks(student, teacher, blocks)
    else:
        names = [n for n, m in student.named_modules() if isinstance(m, FactorizedLayer)]
    with Progress(progress, total=len(names), desc="layer-wise refinement") as bar:
        for name in names:
            bar.set_message(name)
            x_t, y = _capture(teacher, name, batches, max_rows)
            x = _capture(student, name, batches, max_rows)[0] if sequential else x_t
            unit = student.get_submodule(name)
            params = list(unit.parameters()) if blocks is None else _factor_parameters(unit)
            chain = unit.train() if blocks is None else unit.eval()  # a block keeps its normalisation fixed
            opt = torch.optim.Adam(params, lr=lr)
            scale = y.pow(2).mean().clamp_min(1e-12)
            with torch.no_grad():
                best = float((chain(x) - y).pow(2).mean() / scale)
            best_state = [p.detach().clone() for p in params]
            for _ in range(steps):
                loss = (chain(x) - y).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    now = float((chain(x) - y).pow(2).mean() / scale)
                if now < best:
                    best, best_state = now, [p.detach().clone() for p in params]
            with torch.no_grad():  # never worse than the starting factors
                for p, b in zip(params, best_state):
                    p.copy_(b)
            for p in unit.parameters():
                p.grad = None
            unit.eval()
            bar.update(1)
    return student


def _is_factorized(m: nn.Module) -> bool:
    """A module a method built: a chain, or a member of a joint group."""
    from .methods.joint_tucker import JointTuckerConv

    return isinstance(m, (FactorizedLayer, JointTuckerConv))


def _factor_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The distinct parameters of the factorized layers inside ``block`` (a shared core once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in block.modules():
        if _is_factorized(m):
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def _check_blocks(student: nn.Module, teacher: nn.Module, blocks: Sequence[str]) -> list[str]:
    """``blocks`` in network order; DataError naming a block that is missing, nested in
    another, or holds no factorized layer."""
    if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
        raise DataError(f"blocks= is a list of module names (e.g. ['layer1', 'layer2']); got {blocks!r}")
    order = {n: k for k, (n, _) in enumerate(student.named_modules())}
    t_names = dict(teacher.named_modules())
    for b in blocks:
        if b not in order or b not in t_names:
            import difflib

            close = difflib.get_close_matches(b, [n for n in order if n], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise DataError(f"block {b!r} is not a module of both the model and the teacher{hint}")
        if not any(_is_factorized(m) for m in student.get_submodule(b).modules()):
            raise DataError(f"block {b!r} holds no factorized layer: nothing in it would train; compress "
                            "layers inside it first, or leave it out of blocks=")
    for a in blocks:
        for b in blocks:
            if a != b and b.startswith(a + "."):
                raise DataError(f"block {b!r} is inside block {a!r}; name blocks that do not nest")
    return sorted(dict.fromkeys(blocks), key=order.__getitem__)



# ---- iterative compression ----------------------------------------------------------------


def densify(compressed: nn.Module, original: nn.Module) -> nn.Module:
    """The original architecture carrying the weights the compressed model computes: every
    chain and every member of a joint group, probed as the affine map it is (weight and bias)."""
    dense = copy.deepcopy(original)
    done: list[str] = []
    for name, m in compressed.named_modules():
        if not _is_factorized(m) or any(name.startswith(d + ".") for d in done):
            continue
        done.append(name)
        src = linear_view(dense.get_submodule(name))  # Conv1D, nn.Conv1d: the layout their chain has
        w, b = probe_dense(m, src)
        set_dense_weight(src, w)
        if src.bias is not None and b is not None:
            src.bias.data = b.to(src.bias.dtype)
    return dense


@dataclass
class Stage:
    """One stage of :func:`iterative`.

    ``keep``: the stage's target fraction of the parameters (``rank_rule="budget"``) or the
    fraction the stage ended with (``"weakened_vbmf"``); ``params``/``flops``: the compressed
    model's (FLOPs per sample of the first batch's inputs; ``None`` when they cannot be
    counted); ``before``/``after``: :func:`tensorscope.evaluate` against the original, before
    and after the stage's fine-tuning; ``plan``: the whole model's plan after the stage;
    ``ranks``: every decomposed layer's rank; ``changed``: the layers this stage decomposed
    or decomposed again.
    """

    keep: float
    params: int
    before: dict[str, float]
    after: dict[str, float]
    plan: Any = field(repr=False, default=None)
    flops: int | None = None
    ranks: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    stage: int = 0


RANK_RULES = ("budget", "weakened_vbmf")
RECOMPRESS = ("dense", "core")


def _dense_view(small: nn.Module, original: nn.Module) -> nn.Module:
    """The original architecture computing what ``small`` computes: factorized layers rebuilt
    dense (:func:`densify`), every other parameter and buffer taken from ``small`` (fine-tuning
    changed those too)."""
    dense = densify(small, original)
    own = small.state_dict()
    state = dense.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            state[k] = own[k]
    dense.load_state_dict(state)
    return dense.eval()


def _plan_of_chains(model: nn.Module) -> Plan:
    """The plan that describes every factorized layer of ``model``, in network order."""
    entries = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLayer):
            entries[name] = {"method": m.method, "rank": get_method(m.method).rank_to_json(m.rank),
                             **dict(m.options)}
    return Plan(entries)


def _one_sample(batch: Any) -> Any:
    b = split_batch(batch)
    if len(b.args) == 1 and not b.kwargs and isinstance(b.args[0], torch.Tensor):
        return b.args[0][:1]
    return None


def _quality_key(result: dict[str, float]) -> str:
    return "accuracy" if "accuracy" in result else "agreement"


def _check_core_methods(model: nn.Module, names: list[str], methods: Any, rank_rule: str) -> None:
    """PlanError (before any work) naming a layer that ``recompress="core"`` would meet with a
    method that cannot recompress its core."""
    menu = resolve_methods(methods)
    modules = layer_modules(model)  # Conv1D, nn.Conv1d: their views
    for n in names:
        geom = LayerGeometry.of(modules[n])
        if rank_rule == "budget":
            candidates = [m for m in menu if m.unsupported_reason(geom) is None]
        else:
            first = first_method(menu, geom)
            candidates = [first] if first is not None else []
        bad = [m.name for m in candidates if not m.core_recompression]
        if bad:
            able = [m.name for m in menu if m.core_recompression]
            raise PlanError(
                f'recompress="core" needs a method that recompresses its core (Tucker-2); layer {n!r} '
                f"({type(modules[n]).__name__}) would get {', '.join(map(repr, bad))}, which cannot. Restrict "
                f"layers= to layers that {', '.join(map(repr, able)) or 'such a method'} decomposes, put "
                f'that method first in methods=, or use recompress="dense"')


def iterative(
    model: nn.Module,
    data: Any,
    *,
    keep: float | None = None,
    steps: int = 3,
    finetune_steps: int = 100,
    methods: Sequence[str] | str = "auto",
    data_aware: bool = True,
    val_data: Any = None,
    lr: float | None = None,
    rank_rule: str = "budget",
    weakening: float = 0.8,
    min_rank: int = 8,
    layers: Iterable[str] | None = None,
    layers_per_stage: int | None = None,
    max_drop: float | None = None,
    recompress: str = "dense",
    progress: Any = False,
    stop: Callable[[], bool] | None = None,
) -> tuple[nn.Module, History]:
    """Compress in stages, recovering after each (Gusak et al. 2019, MUSCO).

    Each stage chooses ranks on the current (recovered) weights, compresses, measures the
    quality, fine-tunes by distillation from the original (:func:`finetune`,
    ``finetune_steps`` steps; 0 skips it) and measures again.

    Parameters
    ----------
    keep : float in (0, 1]
        With ``rank_rule="budget"`` (required there): stage ``i`` of ``steps`` keeps
        ``keep ** (i / steps)`` of the parameters, ranks from :func:`plan_for_budget`.
    steps : int
        Number of stages (fewer when ``max_drop`` stops it).
    rank_rule : "budget" or "weakened_vbmf"
        ``"weakened_vbmf"``: each stage gives each of its layers MUSCO's rank
        ``max(R - weakening * (R - R_vbmf), min_rank)``, ``R`` its current rank
        (:func:`tensorscope.plan_by_rule`); at ``weakening=0.8`` and a VBMF rank near 40% of
        ``R``, 256 channels go 256, 132, 68, 35, 18 over four stages.
    methods : "auto", a name or names
        For the budget: the planner's menu. For the rule: each layer takes the first that
        applies to it.
    layers : names, optional
        The layers to compress (default: all decomposable layers).
    layers_per_stage : int, optional
        ``k``: each stage compresses the next ``k`` of ``layers`` in network order, then starts
        again from the first (``"weakened_vbmf"`` only; default: all layers every stage).
    max_drop : float, optional
        Stop when a stage ends (after fine-tuning) more than this below the original's
        quality (accuracy with labels, else agreement, as fractions: 0.01 is one point); the
        model of the stage before is returned (the first stage's if it already fails, with a
        warning), and ``History.stopped`` says why.
    recompress : "dense" or "core"
        How a layer decomposed in an earlier stage is decomposed again. ``"dense"``: its
        weight is rebuilt and decomposed from scratch. ``"core"``: its method decomposes the
        chain's own core and merges the new factors into the old ones
        (:meth:`tensorscope.methods.Method.recompress`, Tucker-2); the result has a plain
        chain's shape, so the final plan names the original layers and checkpoints load as
        usual. Ranks are chosen on the rebuilt weights either way.
    data_aware : bool
        Decompose from dense weights with ``data`` as calibration data (core recompression
        uses weights only).
    val_data : optional
        Where quality is measured and fine-tuning stops early (default: ``data``).
    stop : callable, optional
        Checked before each stage and each fine-tuning step (a Stop button): when it returns
        True the stage under way ends its fine-tuning with the best weights so far, is
        measured and kept, no further stage starts, and ``History.stopped`` says so (no stage
        at all: a copy of the original).

    Returns
    -------
    (nn.Module, History)
        The compressed model and one :class:`Stage` per stage run (``History.meta["original"]``:
        the original's quality).

    Raises
    ------
    ValueError
        Bad ``keep``, ``steps``, ``rank_rule``, ``recompress``, ``layers_per_stage`` or
        ``max_drop``; ``weakening`` outside [0, 1].
    PlanError
        An unknown layer (with close matches); ``recompress="core"`` where a layer would get a
        method that cannot recompress its core (Tucker-2 can).
    DataError
        No batches in ``data``.

    Everything is checked before any work; the input model is never modified.
    """
    if rank_rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {', '.join(RANK_RULES)}; got {rank_rule!r}")
    if recompress not in RECOMPRESS:
        raise ValueError(f"recompress must be one of {', '.join(RECOMPRESS)}; got {recompress!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if rank_rule == "budget":
        if keep is None or isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < keep <= 1.0:
            raise ValueError(f'keep must be in (0, 1] with rank_rule="budget"; got keep={keep!r}')
        if layers_per_stage is not None:
            raise ValueError('layers_per_stage needs rank_rule="weakened_vbmf": a budget is a target for the '
                             "whole model, not for a few layers")
    weakening = check_weakening(weakening)
    min_rank = check_min_rank(min_rank)
    if layers_per_stage is not None and (isinstance(layers_per_stage, bool)
                                         or not isinstance(layers_per_stage, numbers.Integral)
                                         or layers_per_stage < 1):
        raise ValueError(f"layers_per_stage must be a positive integer or None; got {layers_per_stage!r}")
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real)
                                 or not math.isfinite(max_drop) or max_drop < 0):
        raise ValueError(f"max_drop must be a finite number >= 0 (a fraction: 0.01 is one point); got {max_drop!r}")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, numbers.Integral) or finetune_steps < 0:
        raise ValueError(f"finetune_steps must be an integer >= 0; got {finetune_steps!r}")
    names = check_layers(model, layers)
    resolve_methods(methods)  # unknown names fail here
    if recompress == "core":
        _check_core_methods(model, names, methods, rank_rule)
    batches = list(iter_batches(data))
    if not batches:
        raise DataError("iterative needs at least one batch of data")
    evaluation = val_data if val_data is not None else batches
    calibration = batches if data_aware else None
    example = _one_sample(batches[0])

    original = evaluate(model, evaluation, reference=model)
    key = _quality_key(original)
    total_params = count_params(model)
    history = History(meta={"original": original, "rank_rule": rank_rule, "recompress": recompress,
                            "params": total_params,
                            "flops": count_flops(model, example) if example is not None else None})
    small = copy.deepcopy(model).eval()
    accepted = small
    start = 0
    with Progress(progress, total=steps, desc="iterative compression") as bar:
        for i in range(1, steps + 1):
            if stop is not None and stop():
                history.stopped = (f"stopped on request after stage {i - 1}" if i > 1
                                   else "stopped on request before the first stage")
                break
            if layers_per_stage is None:
                stage_layers = list(names)
            else:
                stage_layers = [names[(start + j) % len(names)] for j in range(min(layers_per_stage, len(names)))]
                start = (start + layers_per_stage) % max(len(names), 1)
            dense = _dense_view(small, model)
            if rank_rule == "budget":
                k = keep ** (i / steps)
                bar.set_message(f"stage {i}: keep {k:.1%}")
                plan = plan_for_budget(dense, k, methods=methods, data=calibration, layers=names)
            else:
                bar.set_message(f"stage {i}: {len(stage_layers)} layer(s)")
                plan = plan_by_rule(dense, "weakened_vbmf", weakening=weakening, min_rank=min_rank, methods=methods,
                                    layers=stage_layers)
            new, changed = _apply_stage(small, dense, plan, stage_layers, recompress, calibration)
            if not changed and rank_rule != "budget":
                bar.update(1)
                if layers_per_stage is None:  # the same weights give the same ranks: nothing more to do
                    history.stopped = f"stage {i}: no layer's rank went down (every rank at its floor)"
                    break
                continue
            before = evaluate(new, evaluation, reference=model)
            if finetune_steps:
                new = finetune(new, batches, teacher=model, steps=finetune_steps,
                               lr=DEFAULT_LR if lr is None else lr, val_data=val_data, stop=stop)
            after = evaluate(new, evaluation, reference=model)
            params = count_params(new)
            object.__setattr__(new, PLAN_ATTR, _plan_of_chains(new))
            history.append(Stage(
                keep=k if rank_rule == "budget" else params / total_params, params=params, before=before,
                after=after, plan=plan_of(new), flops=count_flops(new, example) if example is not None else None,
                ranks={n: m.rank for n, m in new.named_modules() if isinstance(m, FactorizedLayer)},
                changed=changed, stage=i))
            bar.update(1)
            small = new
            drop = original[key] - after[key]
            if max_drop is not None and drop > max_drop:
                if len(history) == 1:
                    accepted = new
                    history.stopped = (f"stage {i} ended {drop:.4f} below the original's {key} (max_drop="
                                       f"{max_drop:g}); no earlier stage, so its model is returned")
                    warnings.warn(f"iterative: {history.stopped}", stacklevel=2)
                else:
                    history.stopped = (f"stage {i} ended {drop:.4f} below the original's {key} (max_drop="
                                       f"{max_drop:g}); the model of stage {history[-2].stage} is returned")
                break
            accepted = new
    return accepted, history


def _apply_stage(small: nn.Module, dense: nn.Module, plan: Plan, stage_layers: list[str], recompress: str,
                 calibration: Any) -> tuple[nn.Module, list[str]]:
    """A copy of ``small`` with the stage's layers set as ``plan`` says; the layers changed.

    A layer whose planned method and rank are what it already has is left as it is (its
    fine-tuned factors kept); a layer the plan leaves dense becomes dense again.
    """
    new = copy.deepcopy(small)
    rebuild: dict[str, Any] = {}
    core: dict[str, Any] = {}
    dense_again: list[str] = []
    for n in stage_layers:
        cur = small.get_submodule(n)
        entry = plan.layers.get(n)
        if entry is None:
            if isinstance(cur, FactorizedLayer):
                dense_again.append(n)
            continue
        method = get_method(entry.method)
        layer = linear_view(dense.get_submodule(n))  # Conv1D, nn.Conv1d: their views
        geom = LayerGeometry.of(layer)
        rank = method.resolve_rank(geom, entry.rank, entry.options)
        if isinstance(cur, FactorizedLayer) and cur.method == method.name:
            old = method.resolve_rank(geom, cur.rank, cur.options)
            if recompress == "core" and method.core_recompression:
                values = [min(a, b) for a, b in zip(method.axis_values(rank), method.axis_values(old))]
                rank = method.rank_from_axes(geom, values, entry.options)
            if rank == old:
                continue
            if recompress == "core" and method.core_recompression:
                core[n] = (method, layer, cur, rank, entry.options)
                continue
        rebuild[n] = entry
    if rebuild:
        built = compress(dense, Plan({n: e.to_dict() for n, e in rebuild.items()}), data=calibration)
        for n in rebuild:
            set_submodule(new, n, built.get_submodule(n))
    for n, (method, layer, chain, rank, options) in core.items():
        set_submodule(new, n, for_layer(layer, method.recompress(layer, chain, rank, options)))
    for n in dense_again:
        set_submodule(new, n, copy.deepcopy(dense.get_submodule(n)))
    changed = [n for n in stage_layers if n in rebuild or n in core or n in dense_again]
    return new.eval(), changed
