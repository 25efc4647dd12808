"""Benchmark: spectra and whole-model budgets.

Measures, on the built-in ``lenet5`` (trained, from ``tensorscope.examples``) and on a
randomly initialised ResNet-18-style network of 11.2M parameters (``bench/nets.py``, no
torchvision):

* time for all spectra (every decomposable layer, both unfoldings) with a cold factor cache,
  then warm (cached), as a ratio to one dense forward pass of the net on a batch measured in
  the same run;
* time for a budget plan (``plan_for_budget(keep=0.25)``), cold and warm cache;
* peak resident memory while computing all spectra of the 11M network, as a multiple of the
  model's size (measured in a fresh child process);
* accuracy of ``lenet5`` compressed with the budget plan versus a uniform plan at 10%, 25%
  and 50% of the parameters kept. The uniform plan is ``svd`` in every layer with the same
  fraction of its maximal rank, the fraction chosen (bisection) so that the plan keeps the
  same number of parameters as the target. Both are built with ``ts.compress`` and measured
  with ``ts.evaluate`` on the example's 1000 test digits.

Timings are medians of repeats. Run from the repository root::

    python bench/spectra_budget.py [--threads N] [--quick] [--no-write]

and it writes the section "Spectra and budgets" of ``docs/benchmarks.md`` (other sections
are left as they are).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import tensorscope as ts  # noqa: E402
from tensorscope._cache import factor_cache  # noqa: E402
import report  # noqa: E402

SECTION = "Spectra and budgets"
DOC = ROOT / "docs" / "benchmarks.md"


# ---- helpers ------------------------------------------------------------------------------

def median_time(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_time(model, x, repeats: int) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        return median_time(lambda: model(x), repeats)


def all_spectra():
    def run(model):
        ts.spectra(model)
        ts.spectra(model, unfolding="in")
    return run


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


# ---- peak memory in a fresh process -------------------------------------------------------

def _rss_child(threads: int | None) -> None:
    """Run in a child: build the 11M net, compute all spectra, print peak RSS figures (JSON)."""
    import resource

    if threads:
        torch.set_num_threads(threads)
    from nets import resnet18_cifar

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return -1

    model = resnet18_cifar()
    gc.collect()
    before = status("VmRSS")
    try:  # reset the high-water mark so that it covers the spectra only (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    ts.spectra(model)
    ts.spectra(model, unfolding="in")
    seconds = time.perf_counter() - t0
    peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "model_bytes": model_bytes(model), "reset": reset,
                      "cache_bytes": factor_cache._bytes, "seconds": seconds}))


def peak_rss(threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--rss-child"] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- plans --------------------------------------------------------------------------------

def uniform_plan(model, keep: float) -> tuple[ts.Plan, float]:
    """svd in every layer at the same fraction of its maximal rank, sized to keep ``keep`` of the params."""
    infos = ts.inspect(model)
    total = ts.count_params(model)

    def plan_at(f: float) -> ts.Plan:
        return ts.Plan({i.name: {"method": "svd", "rank": max(1, min(i.max_rank["svd"], round(f * i.max_rank["svd"])))}
                        for i in infos})

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if ts.plan_cost(model, plan_at(mid))["params_after"] > keep * total:
            hi = mid
        else:
            lo = mid
    # the closer of the two fractions around the target
    cands = [(abs(ts.plan_cost(model, plan_at(f))["params_after"] - keep * total), f) for f in (lo, hi)]
    f = min(cands)[1]
    return plan_at(f), f


def accuracy_of(model, plan, test, data=None) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = ts.compress(model, plan, data=data)
    acc = ts.evaluate(small, test)["accuracy"]
    return acc, ts.count_params(small) / ts.count_params(model)


# ---- the benchmark ------------------------------------------------------------------------

def bench_timings(name: str, model, x, repeats: int) -> dict:
    fwd = forward_time(model, x, max(repeats, 5))
    run = all_spectra()
    cold = median_time(lambda: run(model), repeats, setup=factor_cache.clear)
    run(model)
    calls = factor_cache.misses
    warm = median_time(lambda: run(model), max(repeats, 5))
    assert factor_cache.misses == calls, "a warm spectra call recomputed a factorization"
    plan_cold = median_time(lambda: ts.plan_for_budget(model, 0.25), repeats, setup=factor_cache.clear)
    ts.plan_for_budget(model, 0.25)
    plan_warm = median_time(lambda: ts.plan_for_budget(model, 0.25), repeats)
    plan = ts.plan_for_budget(model, 0.25)
    kept = ts.plan_cost(model, plan)["params_after"] / ts.count_params(model)
    return {"name": name, "params": ts.count_params(model), "layers": len(ts.inspect(model)),
            "batch": tuple(x.shape), "forward": fwd, "spectra_cold": cold, "spectra_warm": warm,
            "plan_cold": plan_cold, "plan_warm": plan_warm, "plan_kept": kept}


def bench_accuracy(repeats_unused: int = 0) -> tuple[list[dict], float]:
    from tensorscope.examples import load_example

    ex = load_example("lenet5")
    model, test = ex.model.eval(), ex.test_loader(500)
    calib = ex.calibration(256)
    rows = []
    for keep in (0.1, 0.25, 0.5):
        uni, f = uniform_plan(model, keep)
        u_acc, u_kept = accuracy_of(model, uni, test)
        plan = ts.plan_for_budget(model, keep)
        b_acc, b_kept = accuracy_of(model, plan, test)
        plan_d = ts.plan_for_budget(model, keep, data=calib)
        d_acc, d_kept = accuracy_of(model, plan_d, test, data=calib)
        rows.append({"keep": keep, "uniform_fraction": f, "uniform": (u_acc, u_kept), "budget": (b_acc, b_kept),
                     "budget_data": (d_acc, d_kept),
                     "plan": {n: (lp.method, lp.rank) for n, lp in plan.layers.items()},
                     "plan_data": {n: (lp.method, lp.rank) for n, lp in plan_d.layers.items()}})
    return rows, ex.accuracy


def render(timings: list[dict], acc_rows: list[dict], dense_acc: float, rss: dict, meta: dict) -> str:
    lines = [f"## {SECTION}", ""]
    lines.append(
        f"`python bench/spectra_budget.py` on {meta['machine']}; torch {meta['torch']}, "
        f"{meta['threads']} intra-op thread(s), load average at start {meta['load']}. Timings are medians "
        f"of {meta['repeats']} runs (warm: at least 5); ratios are to one dense forward pass of the same "
        "net on the batch shown, measured in the same run.")
    lines += ["", "### Time for all spectra and for a budget plan", "",
              "All spectra = every decomposable layer, both unfoldings (`out`: SVD of out x in*kh*kw; "
              "`in`: mode-1 unfolding). Cold = empty factor cache; warm = second call (no factorization; "
              "checked by the cache's miss count). Plan = `plan_for_budget(model, keep=0.25)`.", "",
              "| network | params | layers | forward (batch) | spectra cold | spectra warm | cold/warm | "
              "plan cold | plan warm | plan keeps |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        f = t["forward"]
        lines.append(
            f"| {t['name']} | {t['params'] / 1e6:.2f}M | {t['layers']} | {fmt_s(f)} ({t['batch'][0]}) | "
            f"{fmt_s(t['spectra_cold'])} ({t['spectra_cold'] / f:.1f}x fwd) | "
            f"{fmt_s(t['spectra_warm'])} ({t['spectra_warm'] / f:.2f}x fwd) | "
            f"{t['spectra_cold'] / t['spectra_warm']:.0f}x | {fmt_s(t['plan_cold'])} ({t['plan_cold'] / f:.1f}x fwd) | "
            f"{fmt_s(t['plan_warm'])} ({t['plan_warm'] / f:.1f}x fwd) | {t['plan_kept']:.1%} |")
    lines += ["", "### Peak memory while computing all spectra of the 11M network", "",
              f"Fresh process; model {rss['model_bytes'] / 2**20:.1f} MiB (parameters and buffers). "
              f"Resident before: {rss['before'] / 2**20:.0f} MiB; peak during spectra: {rss['peak'] / 2**20:.0f} MiB "
              f"({'high-water mark reset before the spectra' if rss['reset'] else 'lifetime peak'}). "
              f"Growth {(rss['peak'] - rss['before']) / rss['model_bytes']:.1f}x the model size; the factor cache "
              f"holds {rss['cache_bytes'] / rss['model_bytes']:.1f}x the model size afterwards. "
              f"Child timing: {fmt_s(rss['seconds'])}.", ""]
    lines += ["### Accuracy of lenet5: budget plan vs uniform plan", "",
              f"Dense lenet5: {dense_acc:.2%} on the 1000 test digits (431,080 parameters). Uniform = `svd` in "
              "every layer at one fraction of its maximal rank (fraction shown), sized to the same parameter count. "
              "Budget = `plan_for_budget(model, keep)` (svd and tucker2, weight errors). Budget + data = the "
              "planner and `compress` given 256 training digits (output errors, whitened factors). "
              "No fine-tuning anywhere.", "",
              "| keep | uniform (svd, fraction) | budget plan | budget + data | budget plan chosen |",
              "|---:|---|---|---|---|"]
    for r in acc_rows:
        u, b, d = r["uniform"], r["budget"], r["budget_data"]
        plan = ", ".join(f"{n}: {m} {list(k) if isinstance(k, tuple) else k}" for n, (m, k) in r["plan"].items())
        lines.append(
            f"| {r['keep']:.0%} | {u[0]:.2%} (keeps {u[1]:.1%}, f={r['uniform_fraction']:.3f}) | "
            f"{b[0]:.2%} (keeps {b[1]:.1%}) | {d[0]:.2%} (keeps {d[1]:.1%}) | {plan} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        _rss_child(args.threads)
        return
    from nets import INPUT_SHAPE, resnet18_cifar
    from tensorscope.examples import load_example

    meta = {"machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU(s)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load": report.load_average(), "repeats": args.repeats}
    print(f"# {meta}", flush=True)
    g = torch.Generator().manual_seed(0)
    lenet = load_example("lenet5").model.eval()
    timings = [bench_timings("lenet5 (built-in CNN)", lenet, load_example("lenet5").example_input(256), args.repeats)]
    print(timings[-1], flush=True)
    big = resnet18_cifar()
    timings.append(bench_timings("ResNet-18-style (random init)", big, torch.randn(64, *INPUT_SHAPE, generator=g),
                                 args.repeats))
    print(timings[-1], flush=True)
    rss = peak_rss(args.threads)
    print(rss, flush=True)
    acc_rows, dense_acc = bench_accuracy()
    for r in acc_rows:
        print(r, flush=True)
    text = render(timings, acc_rows, dense_acc, rss, meta)
    print()
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
