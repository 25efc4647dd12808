"""More calibration data from the same samples: copies that keep what a sample is about.

Data-aware factors whiten with the second moment of each layer's inputs. With few samples
against wide layers (32 sentences, 507 tokens, for MiniLM's 384- and 1536-wide inputs) that
moment is a poor estimate of the inputs to come, and whitening overfits it. Perturbed copies
of each calibration sample widen what the layers see while keeping each sample's structure
(a sentence's positions and context, an image's label):

- token batches: each copy replaces ``rate`` of the positions that are not special (padding,
  the first and last attended position of each row, ids in ``keep``) by other token ids;
- image batches ``(N, C, H, W)``: each copy is a random resized crop back to the same size,
  a horizontal flip and a mild brightness/contrast change (torch only).

On all-MiniLM-L6-v2 at 50% of its encoder's Linear parameters, 8 copies with half the word
pieces replaced lift the mean cosine of embeddings of sentences not used for calibration
from 0.879 to 0.905-0.911 with the tokenizer's whole-word ids as ``vocab=``, and to 0.893
with the calibration sentences' own word pieces (``docs/benchmarks.md``, "Real pretrained
networks").

Each original and its copies stay in one batch, so the two halves that
:func:`tensorscope.collect_stats` keeps for held-out scores (alternate batches) never hold a
copy of a sample of the other half. A single batch, whose halves are its rows, comes back as
two batches (the first and second half of its rows, each with their copies): the held-out
halves are the same samples as without augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .allocation import split_halves
from .data import _describe, iter_batches
from .errors import DataError

__all__ = ["augment_calibration"]

_WHAT = ("augment_calibration takes token batches (a dict with integer 'input_ids' (N, T) and "
         "optionally 'attention_mask', 'token_type_ids', or an integer tensor (N, T)) and float image "
         "batches (N, C, H, W) (a tensor, a dict with 'pixel_values', or either with targets as "
         "(inputs, targets))")


def augment_calibration(
    data: Any,
    copies: int = 8,
    rate: float = 0.5,
    *,
    vocab: Any = None,
    keep: Any = None,
    flip: float = 0.5,
    brightness: float = 0.1,
    contrast: float = 0.1,
    seed: int = 0,
) -> list:
    """New calibration batches: each batch of ``data`` followed, in the same batch, by ``copies``
    perturbed copies of its rows (``copies + 1`` times the rows).

    Pass the result wherever calibration data goes (``collect_stats``, ``plan_for_budget(data=)``,
    ``compress(data=)``, ``correct``); ``data`` itself is left untouched.

    Parameters
    ----------
    data : iterable of batches, or one batch
        Token batches or float image batches (see the module docstring); a ``(inputs, targets)``
        batch gets its targets repeated with the rows.
    copies : int
        Perturbed copies per sample (>= 1).
    rate : float in [0, 1)
        How much each copy changes. Tokens: the probability that a non-special position is
        replaced (by an id different from its own, where the pool has one). Images: the
        largest fraction of the area a crop drops (crops keep ``1 - rate`` to all of it).
    vocab : sequence or 1-D tensor of ids, optional
        Tokens: the ids replacements are drawn from, uniformly (e.g. a tokenizer's whole-word
        ids). Default: the ids at the non-special positions of ``data`` itself, as often as
        they occur there (the empirical distribution; no tokenizer needed), each half of the
        data (as ``collect_stats`` splits it) drawing from its own, so that no held-out half
        sees the other's words. On MiniLM a tokenizer's words measured better on unseen
        sentences (``docs/benchmarks.md``): pass them when you have the tokenizer.
    keep : sequence of ids, optional
        Tokens: ids never replaced (e.g. a separator inside a sentence pair, or the padding id
        of batches without an ``attention_mask``). Without an ``attention_mask`` every position
        counts as attended.
    flip, brightness, contrast : float
        Images: the probability of a horizontal flip; the largest shift of the mean by a
        fraction of each image's standard deviation; the largest relative change of the
        contrast (scaling about each channel's mean). ``rate=0, flip=1, brightness=0,
        contrast=0`` makes every copy the exact mirror image.
    seed : int
        Seed of the random choices: the same arguments give the same batches.

    Returns
    -------
    list of batches
        One per batch of ``data`` (two for a single batch of two or more rows, see the module
        docstring), in the form the batch came in.

    Raises
    ------
    DataError
        For data that is neither token nor image batches, ``vocab`` or ``keep`` on image
        batches, and batches with nothing to replace and no ``vocab``.
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise DataError(f"copies must be a positive integer (copies per sample); got {copies!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise DataError(f"rate must be a number in [0, 1) (the fraction each copy changes); got {rate!r}")
    for name, v, ok, span in (("flip", flip, lambda v: 0 <= v <= 1, "in [0, 1] (a probability)"),
                              ("brightness", brightness, lambda v: 0 <= v < math.inf, "a non-negative number"),
                              ("contrast", contrast, lambda v: 0 <= v < 1, "in [0, 1)")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise DataError(f"{name} must be {span}; got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer; got {seed!r}")
    batches = list(iter_batches(data))
    if not batches:
        raise DataError("augment_calibration: the data yielded no batches; pass at least one batch")
    parts = [_parts(b, i) for i, b in enumerate(batches)]
    if len(parts) == 1 and parts[0][1].shape[0] >= 2:  # halves of one batch are its rows: two batches
        halves = split_halves(batches)  # as collect_stats splits it
        if halves is not None:
            parts = [_parts(b, 0) for b in (*halves[0], *halves[1])]
    kinds = {p[0] for p in parts}
    if len(kinds) > 1:
        raise DataError(f"augment_calibration: the batches mix token and image inputs ({sorted(kinds)}); "
                        "augment each kind on its own")
    kind = kinds.pop()
    gen = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        keep_ids = _ids(keep, "keep", allow_empty=True)
        specials = [_special(ids, mask, keep_ids) for _, ids, mask, _, _ in parts]
        if vocab is None:  # each half draws from its own tokens: held-out halves stay apart
            seen = [ids[~sp].reshape(-1).cpu() for (_, ids, _, _, _), sp in zip(parts, specials)]
            every = torch.cat(seen)
            if every.numel() == 0:
                raise DataError("augment_calibration: the token batches have no position to replace (every "
                                "one is padding, a row's first or last token, or in keep=); pass longer "
                                "sequences or fewer ids in keep=")
            halves = [torch.cat(seen[0::2]), torch.cat(seen[1::2]) if len(seen) > 1 else every]
            pools = [halves[i % 2] if halves[i % 2].numel() else every for i in range(len(parts))]
        else:
            pools = [_ids(vocab, "vocab", allow_empty=False)] * len(parts)
        return [_rebuild(p, _token_copies(p[1], sp, pool, copies, float(rate), gen), copies)
                for p, sp, pool in zip(parts, specials, pools)]
    if vocab is not None or keep is not None:
        raise DataError("vocab= and keep= are token ids; these batches are images (N, C, H, W): drop them")
    return [_rebuild(p, _image_copies(p[1], copies, float(rate), float(flip), float(brightness), float(contrast),
                                      gen), copies) for p in parts]


# ---- reading batches ------------------------------------------------------------------------


def _parts(batch: Any, i: int) -> tuple:
    """``(kind, main tensor, attention mask, container, targets)`` of one batch; ``container``
    says how to put it back: ``("tensor",)`` or ``("dict", dict, key)``."""
    target, has_target, inputs = None, False, batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0 or len(batch) > 2:
            raise DataError(f"batch {i}: {_describe(batch)} is not (inputs, targets). {_WHAT}.")
        inputs = batch[0]
        if len(batch) == 2:
            target, has_target = batch[1], True
            if not isinstance(target, Tensor):
                raise DataError(f"batch {i}: the targets of an (inputs, targets) batch must be a tensor; got "
                                f"{_describe(target)}")
    if isinstance(inputs, Tensor):
        x, container, mask = inputs, ("tensor",), None
    elif isinstance(inputs, Mapping):
        key = "input_ids" if "input_ids" in inputs else "pixel_values" if "pixel_values" in inputs else None
        if key is None or not isinstance(inputs[key], Tensor):
            raise DataError(f"batch {i}: a dict batch needs a tensor 'input_ids' (tokens) or 'pixel_values' "
                            f"(images); got {_describe(inputs)}. {_WHAT}.")
        x, container = inputs[key], ("dict", inputs, key)
        mask = inputs.get("attention_mask") if key == "input_ids" else None
    else:
        raise DataError(f"batch {i}: cannot augment {_describe(batch)}. {_WHAT}.")
    if not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool and x.dim() == 2:
        kind = "tokens"
        if mask is not None:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(x.shape):
                raise DataError(f"batch {i}: attention_mask must be a tensor of the shape of input_ids "
                                f"{tuple(x.shape)}; got {_describe(mask)}")
            mask = mask != 0
    elif x.is_floating_point() and x.dim() == 4:
        kind = "images"
    else:
        raise DataError(f"batch {i}: inputs {x.dtype} of shape {tuple(x.shape)} are neither token ids (an integer "
                        f"tensor (N, T)) nor images (a float tensor (N, C, H, W)). {_WHAT}; for other inputs, "
                        "gather more calibration samples instead.")
    if x.shape[0] == 0:
        raise DataError(f"batch {i} has no rows")
    if has_target and (target.dim() == 0 or target.shape[0] != x.shape[0]):
        raise DataError(f"batch {i}: targets of shape {tuple(target.shape)} do not have one row per sample "
                        f"({x.shape[0]}); they cannot be repeated with the copies")
    return kind, x, mask, container, (target if has_target else _NO_TARGET)


_NO_TARGET = object()


def _rebuild(p: tuple, new_x: Tensor, copies: int) -> Any:
    """The batch of ``p`` with its main tensor ``new_x`` and every other per-row tensor repeated."""
    _, x, _, container, target = p
    n, k = x.shape[0], copies + 1
    rep = lambda v: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731,E501
    if container[0] == "tensor":
        inputs: Any = new_x
    else:
        inputs = {key: (new_x if key == container[2] else rep(v)) for key, v in container[1].items()}
    return inputs if target is _NO_TARGET else (inputs, rep(target))


def _ids(v: Any, name: str, allow_empty: bool) -> Tensor:
    if v is None:
        return torch.empty(0, dtype=torch.long)
    if isinstance(v, Tensor):
        t = v.detach().cpu()
    elif isinstance(v, Sequence) and not isinstance(v, (str, bytes)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v):
        t = torch.tensor(list(v), dtype=torch.long)
    else:
        raise DataError(f"{name}= must be a sequence or 1-D tensor of integer token ids; got {_describe(v)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1:
        raise DataError(f"{name}= must be a 1-D tensor of integer token ids; got {t.dtype} of shape {tuple(t.shape)}")
    if not allow_empty and t.numel() == 0:
        raise DataError(f"{name}= is empty: give at least one token id to draw from")
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"{name}= holds negative ids ({int(t.min())}); token ids are >= 0")
    return t.long()


# ---- tokens ---------------------------------------------------------------------------------


def _special(ids: Tensor, mask: Tensor | None, keep: Tensor) -> Tensor:
    """Positions never replaced: padding, the first and last attended position of each row,
    and ids in ``keep``."""
    attended = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device)
    special = ~attended
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    any_row = attended.any(1)
    first = torch.where(attended, pos, ids.shape[1]).min(1).values
    last = torch.where(attended, pos, -1).max(1).values
    rows = torch.arange(ids.shape[0], device=ids.device)[any_row]
    special[rows, first[any_row]] = True
    special[rows, last[any_row]] = True
    if keep.numel():
        special |= torch.isin(ids, keep.to(ids.device))
    return special


def _token_copies(ids: Tensor, special: Tensor, pool: Tensor, copies: int, rate: float,
                  gen: torch.Generator) -> Tensor:
    """``ids`` followed by ``copies`` copies with ``rate`` of the non-special positions replaced
    by draws from ``pool`` different from the id they replace (redrawn where equal, while the
    pool allows)."""
    out = [ids]
    distinct = pool.unique().numel() > 1
    for _ in range(copies):
        swap = (torch.rand(ids.shape, generator=gen) < rate).to(ids.device) & ~special
        new = pool[torch.randint(len(pool), ids.shape, generator=gen)].to(ids.device, ids.dtype)
        for _ in range(32 if distinct else 0):  # an id drawn equal to its own is no change: draw again
            same = swap & (new == ids)
            if not bool(same.any()):
                break
            redraw = pool[torch.randint(len(pool), ids.shape, generator=gen)].to(ids.device, ids.dtype)
            new = torch.where(same, redraw, new)
        out.append(torch.where(swap, new, ids))
    return torch.cat(out)


# ---- images ---------------------------------------------------------------------------------


def _image_copies(x: Tensor, copies: int, rate: float, flip: float, brightness: float, contrast: float,
                  gen: torch.Generator) -> Tensor:
    """``x`` followed by ``copies`` copies: a random resized crop (area ``1 - rate`` to 1, aspect
    3/4 to 4/3) back to the same size, a horizontal flip, brightness and contrast jitter."""
    n = x.shape[0]
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # grid_sample on CPU wants float32+
    out = [x]
    for _ in range(copies):
        y = work
        if rate > 0:
            area = 1 - rate * torch.rand(n, generator=gen, dtype=torch.float64)
            aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen, dtype=torch.float64))
            w = (area * aspect).sqrt().clamp(max=1.0)
            h = (area / aspect).sqrt().clamp(max=1.0)
            cx = (1 - w) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
            cy = (1 - h) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
            theta = torch.zeros(n, 2, 3, dtype=torch.float64)
            theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
            grid = F.affine_grid(theta.to(y.device, y.dtype), list(y.shape), align_corners=False)
            y = F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=False)
        flips = (torch.rand(n, generator=gen) < flip).to(y.device)
        if bool(flips.any()):
            y = torch.where(flips[:, None, None, None], y.flip(-1), y)
        if brightness > 0 or contrast > 0:
            c = 1 + contrast * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
            b = brightness * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
            mean = y.mean(dim=(2, 3), keepdim=True)
            std = y.std(dim=(1, 2, 3), keepdim=True) if y[0].numel() > 1 else torch.zeros_like(mean[:, :1])
            y = mean + c.to(y.device, y.dtype) * (y - mean) + b.to(y.device, y.dtype) * std
        out.append(y.to(x.dtype))
    return torch.cat(out)
