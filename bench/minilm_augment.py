"""MiniLM at 50%: the augmented calibration pipeline, its pool of replacement ids and where its time goes.

    python bench/minilm_augment.py PIPELINE [PIPELINE ...] [--heldout] [--threads 1]

PIPELINE is ``base`` (no augmentation: the same-run baseline), or ``POOL[+LEVER...]`` with POOL
``vocab`` (replacements from the tokenizer's whole-word ids) or ``data`` (from the calibration
sentences' own word pieces, ``ts.augment_calibration``'s default) and levers:

- ``og``: output gradients from the 32 original sentences only, input moments from the
  augmented batches (``collect_stats(..., gradient_data=)``);
- ``mo``: the planner's end-to-end check (``measure``) on the original sentences only;
- ``co``: sequential correction on the original sentences only;
- ``p4``, ``p16``: 4 or 16 output-gradient probes per sample instead of 8;
- ``nc``: no sequential correction;
- ``s1``: augmentation seed 1 instead of 0.

Each pipeline is statistics (output gradients), ``plan_for_budget(allocation="output")``,
``compress``, ``correct``, timed per stage at one thread; the evaluation cosine on the 131
evaluation sentences; with ``--heldout``, from calibration data alone: factors fitted on one
half (and corrected on it), mean cosine on the other half's original sentences, both ways.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import real_networks as rn  # noqa: E402
import tensorscope as ts  # noqa: E402
from tensorscope._cache import factor_cache  # noqa: E402


def embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def clear(st):
    factor_cache.clear()
    for s in st.values():
        s._memo.clear()
    gc.collect()


def pipeline(net, spec: str, keep: float, heldout: bool) -> dict:
    pool, *levers = spec.split("+")
    unknown = set(levers) - {"og", "mo", "co", "p4", "p16", "nc", "s1"}
    if unknown or pool not in ("base", "vocab", "data"):
        raise SystemExit(f"unknown pipeline {spec!r}")
    model, layers, orig = net.model, net.layers, net.calib
    probes = 4 if "p4" in levers else 16 if "p16" in levers else 8
    t = {}
    t0 = time.perf_counter()
    cal = orig if pool == "base" else net.augmented(pool=pool, seed=1 if "s1" in levers else 0)
    t["augment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "og" in levers:
        st = ts.collect_stats(model, cal, layers, gradients=True, probes=probes, grad_batch=16, gradient_data=orig)
    else:
        st = ts.collect_stats(model, cal, layers, gradients=True, probes=probes, grad_batch=16)
    t["stats"] = time.perf_counter() - t0
    clear(st)
    t0 = time.perf_counter()
    plan = ts.plan_for_budget(model, keep, layers=layers, stats=st, data=orig if "mo" in levers else cal,
                              allocation="output")
    t["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    small = ts.compress(model, plan, stats=st)
    t["compress"] = time.perf_counter() - t0
    corr = orig if "co" in levers else cal
    t0 = time.perf_counter()
    if "nc" not in levers:
        small = ts.correct(small, model, corr, stats=st)
    t["correct"] = time.perf_counter() - t0
    t["total"] = sum(v for k, v in t.items())
    row = {"pipeline": spec, "eval": round(net.score(small), 4), **{k: round(v, 1) for k, v in t.items()}}
    if heldout:
        refs = [embed(model, b) for b in orig]
        a, b = st.halves
        corr_parts = [corr[0::2], corr[1::2]] if len(corr) > 1 else [corr, corr]
        hc = []
        for fit, k in ((a, 1), (b, 0)):
            clear(st)
            sm = ts.compress(model, plan, stats=fit)
            if "nc" not in levers:
                sm = ts.correct(sm, model, corr_parts[1 - k], stats=fit)
            hc.append(round(float((embed(sm, orig[k]) * refs[k]).sum(-1).mean()), 4))
        row["heldout"] = hc
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipelines", nargs="+")
    p.add_argument("--heldout", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    net = rn.MiniLM()
    rn.sizes(net)
    keep = rn.keep_total(net, 0.5)
    for spec in args.pipelines:
        pipeline(net, spec, keep, args.heldout)


if __name__ == "__main__":
    main()
