"""Benchmark: one joint Tucker over the tower's six convs (T-Net) versus independent Tucker-2.

The built-in ``tower`` has six identical residual 32 -> 32 3x3 convs (``blocks.k.conv``,
55,296 parameters together). At each target (the six convs' parameters divided by 55 and by
24), both forms get the same parameter budget for the six convs:

* ``joint_tucker``: one group over the six convs, at the rank triple ``[r_layer, r_out, r_in]``
  of least HOSVD error among those whose count does not exceed the budget;
* ``joint_tucker`` with ``r_layer = 6``: each layer keeps a core of its own, only the channel
  factors are shared; the least-error ``[r_out, r_in]`` within the budget;
* ``tucker2``: each conv alone, all at one rank pair ``[r_out, r_in]``, the pair of least total
  HOSVD error among those whose six counts together do not exceed the budget.

Both are built by ``ts.compress`` (HOOI-refined factors). Reported: the six convs' parameters,
the stacked kernels' relative weight error, the test accuracy right after ``compress`` (1000
digits), after a short fine-tune (``ts.train``, Adam 1e-3, ``--epochs`` of the 4000 training
digits), and the same structure trained from a random start (``ts.tensorize(init="random")``
then ``ts.train``, Adam 3e-3, ``--scratch-epochs``; T-Net trains its tensor end to end);
seeds 0, 1, 2 (mean and half-range), the dense accuracy alongside. One thread.

Run from the repository root::

    python bench/joint.py [--no-write] [--epochs 2] [--scratch-epochs 4]

It writes the section "Joint Tucker (T-Net) versus Tucker-2" of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import tensorscope as ts  # noqa: E402
from tensorscope.examples import load_example  # noqa: E402
from tensorscope.methods import LayerGeometry, get_group_method, get_method  # noqa: E402
import report  # noqa: E402

SECTION = "Joint Tucker (T-Net) versus Tucker-2"
RATIOS = (55, 24)
SEEDS = (0, 1, 2)
MEMBERS = [f"blocks.{k}.conv" for k in range(6)]


def accuracy(model, loader) -> float:
    return 100.0 * float(ts.evaluate(model, loader)["accuracy"])


def joint_rank(layers, geoms, budget):
    jt = get_group_method("joint_tucker")
    t = jt.tradeoff_group(layers, geoms)
    ok = [k for k in range(len(t.ranks)) if t.params[k] <= budget]
    k = min(ok, key=lambda i: t.errors[i])
    return list(t.ranks[k])


def joint_rank_all_layers(layers, geoms, budget):
    """The least-error ``[L, r_out, r_in]`` within the budget: every layer keeps its own core
    (r_layer = number of layers), the channel factors are what the layers share."""
    jt = get_group_method("joint_tucker")
    n = len(layers)
    stack = torch.stack([m.weight.detach().double() for m in layers])
    best = None
    for a in range(1, 33):
        for b in range(1, 33):
            if jt.count_params_group(geoms, (n, a, b)) > budget:
                continue
            rec = torch.stack(jt.reconstruct_group(layers, jt.factorize_group(layers, (n, a, b), refine=False)))
            err = float((rec.double() - stack).norm())
            if best is None or err < best[0]:
                best = (err, [n, a, b])
    return best[1]


def tucker2_rank(layers, geoms, budget):
    tk = get_method("tucker2")
    best = None
    mo, mi = tk.max_rank(geoms[0])
    for a in range(1, mo + 1):
        for b in range(1, mi + 1):
            if sum(tk.count_params(g, (a, b)) for g in geoms) > budget:
                continue
            err = sum(tk.cheap_error(m, (a, b)) ** 2 * float(m.weight.detach().pow(2).sum()) for m in layers)
            if best is None or err < best[0]:
                best = (err, [a, b])
    return best[1]


def stacked_error(model, small) -> float:
    from tensorscope.densify import probe_dense

    errs, total = 0.0, 0.0
    for n in MEMBERS:
        w = model.get_submodule(n).weight.detach().double()
        w_hat = probe_dense(small.get_submodule(n), model.get_submodule(n))[0].double()
        errs += float((w_hat - w).pow(2).sum())
        total += float(w.pow(2).sum())
    return (errs / total) ** 0.5


def finetune(small, train, test, seed: int, epochs: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
    torch.manual_seed(seed)
    tuned, _ = ts.train(small, loader, epochs=epochs, optimizer="adam", lr=1e-3)
    return accuracy(tuned, test)


def scratch(model, plan, train, test, seed: int, epochs: int) -> float:
    net = ts.tensorize(model, plan, init="random", seed=seed)
    torch.manual_seed(seed)
    for mod in net.modules():  # the whole network starts afresh, not only the planned layers
        if mod is not net and not list(mod.children()) and callable(getattr(mod, "reset_parameters", None)):
            mod.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
    torch.manual_seed(seed)
    trained, _ = ts.train(net, loader, epochs=epochs, optimizer="adam", lr=3e-3)
    return accuracy(trained, test)


def summary(rows) -> str:
    """What the table says against what RESEARCH.md expected, and why it may differ."""
    by = {(r[0], r[1]): r for r in rows}
    parts, ahead = [], {}
    for ratio in RATIOS:
        j, t = by.get((ratio, "joint_tucker")), by.get((ratio, "tucker2"))
        if j and t:
            jm, tm = statistics.mean(j[7]), statistics.mean(t[7])
            js, tsc = statistics.mean(j[8]), statistics.mean(t[8])
            parts.append(f"at {ratio}x joint {jm:.1f} vs tucker2 {tm:.1f}% fine-tuned, {js:.1f} vs {tsc:.1f}% from "
                         "scratch")
            ahead[ratio] = (jm > tm, js > tsc)
    lo, hi = min(r[5] for r in rows), max(r[5] for r in rows)
    pattern = ahead.get(55, (False, False)), ahead.get(24, (True, True))
    reproduced = [k for k, name in enumerate(("fine-tuned", "from scratch")) if pattern[0][k] and not pattern[1][k]]
    verdict = ("The expected pattern (joint ahead at 55x, behind at 24x) holds "
               + " and ".join(("fine-tuned", "from scratch")[k] for k in reproduced) + ". "
               if reproduced else "The expected pattern (joint ahead at 55x, behind at 24x) does not hold here. ")
    return (
        "Expected (RESEARCH.md, our earlier experiment on scikit-learn's 8x8 digits, trained): joint ahead at 55x "
        "(95.8 vs 92.8%), behind at 24x (97.6 vs 98.4%). Measured here: " + "; ".join(parts) + ". " + verdict +
        "Where it misses, the reasons we see: (1) post hoc, 55x and 24x of these trained convs leave every "
        f"form with most of the kernels' energy gone (stacked weight error {lo:.2f}-{hi:.2f}), so the residual tower "
        "falls to chance right after `compress` and what follows is mostly retraining; (2) the rank of least "
        "weight error is not the rank that trains best: at 55x it is r_layer = 1 (six kernels proportional to "
        "one another), the r_layer = 6 row shares only the channel factors; (3) the training here is short "
        "(a few epochs at a constant Adam step, where the dense example needed 10 with a cosine decay) and its "
        "seed spread is several points, as large as the differences the expectation names; (4) the earlier "
        "experiment used 8x8 digits (the same six 32->32 kernels, other inputs and training). The mechanics "
        "(one core, exact at full rank, counted once) are tested in tests/test_groups.py; differences within "
        "the seed spread are noise."
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--scratch-epochs", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = report.load_average()
    t0 = time.perf_counter()
    ex = load_example("tower")
    model, test = ex.model.eval(), ex.test_loader()
    layers = [model.get_submodule(n) for n in MEMBERS]
    geoms = [LayerGeometry.of(m) for m in layers]
    conv_params = sum(g.dense_params for g in geoms)
    dense_acc = accuracy(model, test)
    rows = []
    for ratio in RATIOS:
        budget = conv_params / ratio
        rj = joint_rank(layers, geoms, budget)
        rt = tucker2_rank(layers, geoms, budget)
        ra = joint_rank_all_layers(layers, geoms, budget)

        def group(rank):
            return {"tensorscope_plan": 2, "layers": {},
                    "groups": {"tower": {"method": "joint_tucker", "layers": MEMBERS, "rank": rank}}}

        plans = {"joint_tucker": (rj, group(rj)), "joint_tucker, r_layer = 6": (ra, group(ra)),
                 "tucker2": (rt, {n: {"method": "tucker2", "rank": rt} for n in MEMBERS})}
        for name, (rank, plan) in plans.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = ts.compress(model, plan)
            cost = ts.plan_cost(model, plan)
            p = cost["params_after"] - (cost["params"] - conv_params)
            assert p == ts.count_params(small) - (ts.count_params(model) - conv_params)
            err = stacked_error(model, small)
            post = accuracy(small, test)
            tuned = [finetune(small, ex.train, test, s, args.epochs) for s in SEEDS]
            fresh = [scratch(model, plan, ex.train, test, s, args.scratch_epochs) for s in SEEDS]
            rows.append((ratio, name, rank, p, conv_params / p, err, post, tuned, fresh))
            print(rows[-1], f"{time.perf_counter() - t0:.0f} s", flush=True)
    total = time.perf_counter() - t0
    lines = [
        f"## {SECTION}\n",
        f"`python bench/joint.py`: the built-in `tower` (dense {dense_acc:.1f}% on the 1000 test digits); its six "
        f"identical residual 32->32 3x3 convs ({conv_params:,} parameters) as one `joint_tucker` group (one core "
        "over the stacked kernels) or as six independent `tucker2` chains (one rank pair for all), at the same "
        "budget for the six convs (their parameters / 55 and / 24): each form takes the rank of least HOSVD error "
        "within the budget; the second joint row keeps r_layer = 6 (each layer its own core, the channel factors "
        "shared) and takes the least-error [r_out, r_in]. Built by `ts.compress` (HOOI-refined). "
        "Fine-tune: `ts.train`, Adam 1e-3, "
        f"{args.epochs} epoch(s) of the 4000 training digits. From scratch: the same structure, every weight "
        f"drawn afresh (`ts.tensorize(init=\"random\")`), `ts.train` Adam 3e-3 for {args.scratch_epochs} epochs "
        f"(the dense example: Adam 3e-3, cosine, 10 epochs). Seeds {', '.join(map(str, SEEDS))} (mean ± half-range). "
        f"One thread; torch {torch.__version__}; load average at start {load0}, at end "
        f"{report.load_average()}; total {total:.0f} s.\n",
        "| target | form | rank | conv parameters | ratio | stacked weight error | after compress | fine-tuned | "
        "from scratch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(xs):
        return f"{statistics.mean(xs):.1f} ± {(max(xs) - min(xs)) / 2:.1f}%"

    for ratio, name, rank, p, r, err, post, tuned, fresh in rows:
        lines.append(f"| {ratio}x | `{name}` | {rank} | {p:,} | {r:.1f}x | {err:.3f} | {post:.1f}% | {ms(tuned)} | "
                     f"{ms(fresh)} |")
    lines.append("")
    lines.append(summary(rows))
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)


if __name__ == "__main__":
    main()
