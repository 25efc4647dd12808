"""Benchmark: tensorized layers (TT), sweep versus rebuild, and training them from scratch.

Two measurements, each with its baseline measured in the same run (read the ratios: the
machine is shared):

(a) **Sweep, rebuild, auto.** ``TTLinear`` n x n (n = 256, 1024, 4096; shapes from
    ``tt_shapes``, 4 cores) at bond rank 4 and 16, batch 1, 32 and 128, one intra-op
    thread, ``torch.inference_mode``: the forward time of the ``"sweep"`` and ``"rebuild"``
    modes as ratios to a dense ``nn.Linear(n, n)`` timed in the same rounds (round-robin,
    median over rounds), the FLOP ratios (``FlopCounterMode``), and the mode the cost model
    picks (``mode=None`` with ``batch`` set to the batch): "auto" is the picked mode's time,
    and the target is **auto within 10% of the faster mode** in every case.
(b) **Training from scratch versus post-hoc.** The built-in ``mlp`` (784-1024-1024-10): its
    two large Linear layers ``fc1``, ``fc2`` as TT (``tt_shapes``, one uniform bond rank
    chosen so that the two keep 1/10 and 1/50 of their parameters; ``fc3``, 10,250
    parameters, stays dense). Post-hoc = ``compress`` (TT-SVD) + ``ts.finetune`` (teacher =
    the trained mlp, labels too, ``steps`` = the same number of optimizer steps as
    training). From scratch = ``tensorize(init="random")`` + ``ts.train`` (Adam, labels only),
    without and with ``shuffle`` (RsTD). Every TT layer has ``"batch": 128``, the training
    batch, so the automatic mode rebuilds. Accuracy on the example's 1000 test digits
    (never used to choose anything); one seed.

Run from the repository root::

    python bench/tensorized_layers.py [--quick] [--epochs N] [--threads N] [--no-write]

It writes the section "Tensorized layers: sweep, rebuild, training from scratch" of
``docs/benchmarks.md`` (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import tensorscope as ts  # noqa: E402
from tensorscope.examples import load_example  # noqa: E402
from tensorscope.methods import LayerGeometry, get_method  # noqa: E402
from tensorscope.methods.tt import tt_shapes  # noqa: E402
from tensorscope.tt_layers import CALL_COST, ELEMENT_COST, TTLinear  # noqa: E402
import report  # noqa: E402

SECTION = "Tensorized layers: sweep, rebuild, training from scratch"


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.1f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def flops(mod: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        mod(x)
    return fc.get_total_flops()


def time_round_robin(fns: dict[str, callable], rounds: int, min_time: float) -> dict[str, float]:
    """Median seconds per call of each function, timed once per round in turn."""
    reps = {}
    for name, fn in fns.items():  # warm up, and pick repetitions that last about min_time
        fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, int(min_time / one))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return {n: statistics.median(v) for n, v in times.items()}


# ---- (a) sweep, rebuild, auto ------------------------------------------------------------------


#: the two 4096 x 4096 TT layers of "Versus tensorly-torch and dense layers" (4x fewer parameters),
#: whose sweep ran 64-128x slower than dense at batch 128
LARGE_BONDS = [((8, 8, 8, 8), (8, 8, 8, 8), (1, 64, 511, 64, 1)), ((16, 16, 16), (16, 16, 16), (1, 127, 127, 1))]


def layer_rows(sizes, batches, ranks, rounds: int, min_time: float, large=()) -> list[dict]:
    rows = []
    tt = get_method("tt")
    cases = []
    for n in sizes:
        ins, outs = tt_shapes(n, n)
        geom = LayerGeometry(kind="linear", in_features=n, out_features=n)
        cases += [(n, ins, outs, tt.resolve_rank(geom, r, {"in_shape": ins, "out_shape": outs}), batches)
                  for r in ranks]
    cases += [(4096, list(i), list(o), b, (128,)) for i, o, b in large]
    dense_of: dict[int, nn.Module] = {}
    for n, ins, outs, bonds, batch_list in cases:
        dense = dense_of.setdefault(n, nn.Linear(n, n))
        r = max(bonds)
        sweep = TTLinear(ins, outs, bonds, mode="sweep")
        rebuild = TTLinear(ins, outs, bonds, mode="rebuild")
        rebuild.load_state_dict(sweep.state_dict())
        for b in batch_list:
            x = torch.randn(b, n)
            pick = TTLinear(ins, outs, bonds, batch=b).mode
            with torch.inference_mode():
                t = time_round_robin({"dense": lambda: dense(x), "sweep": lambda: sweep(x),
                                      "rebuild": lambda: rebuild(x)}, rounds, min_time)
            fd = flops(dense, x)
            faster = min(t["sweep"], t["rebuild"])
            rows.append({"n": n, "shapes": "x".join(map(str, ins)), "ranks": list(bonds), "batch": b, "pick": pick,
                         "dense_s": t["dense"], "sweep": t["sweep"] / t["dense"],
                         "rebuild": t["rebuild"] / t["dense"], "auto": t[pick] / t["dense"],
                         "auto_vs_faster": t[pick] / faster,
                         "flops_sweep": flops(sweep, x) / fd, "flops_rebuild": flops(rebuild, x) / fd})
            print(f"n={n} r={r} b={b}: sweep {rows[-1]['sweep']:.2f} rebuild {rows[-1]['rebuild']:.2f} "
                  f"pick {pick} -> {rows[-1]['auto_vs_faster']:.2f} of the faster", flush=True)
    return rows


def layer_table(rows: list[dict]) -> str:
    head = ("| n | input factors | bonds | batch | dense | sweep / dense | rebuild / dense | FLOPs sweep / dense | "
            "FLOPs rebuild / dense | auto picks | auto / faster | |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|\n")
    body = ""
    for r in rows:
        ok = "**pass**" if r["auto_vs_faster"] <= 1.10 else "**fail**"
        body += (f"| {r['n']} | {r['shapes']} | {r['ranks']} | {r['batch']} | {fmt_s(r['dense_s'])} | {r['sweep']:.2f} | "
                 f"{r['rebuild']:.2f} | {r['flops_sweep']:.3f} | {r['flops_rebuild']:.3f} | {r['pick']} | "
                 f"{r['auto_vs_faster']:.2f} | {ok} |\n")
    return head + body


# ---- (b) the mlp: post-hoc versus from scratch -------------------------------------------------


def fc_plan(model: nn.Module, keep: float, shuffle: int | None = None) -> tuple[dict, int]:
    """One uniform TT bond rank for fc1 and fc2, the largest keeping at most ``keep`` of their parameters."""
    tt = get_method("tt")
    layers = {n: model.get_submodule(n) for n in ("fc1", "fc2")}
    dense = sum(LayerGeometry.of(m).dense_params for m in layers.values())
    best = None
    for r in range(1, 257):
        cost = sum(tt.count_params(LayerGeometry.of(m), tt.resolve_rank(LayerGeometry.of(m), r)) for m in layers.values())
        if cost <= keep * dense:
            best = r
    entry = {"method": "tt", "rank": best, "batch": 128}
    if shuffle is not None:
        entry["shuffle"] = shuffle
    return {n: dict(entry) for n in layers}, best


def accuracy(model: nn.Module, loader) -> float:
    return float(ts.evaluate(model, loader)["accuracy"])


def mlp_rows(epochs: int, keeps=(0.1, 0.02)) -> tuple[list[dict], dict]:
    ex = load_example("mlp")
    model = ex.model.eval()
    train = ex.train_loader(batch_size=128, shuffle=True)
    steps = epochs * len(train)
    test = ex.test_loader()
    base = {"acc": accuracy(model, test), "params": ts.count_params(model), "steps": steps}
    fc = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel() for n in ("fc1", "fc2"))
    rows = []
    for keep in keeps:
        plan, r = fc_plan(model, keep)
        t0 = time.perf_counter()
        small = ts.compress(model, plan)
        acc0 = accuracy(small, test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuned = ts.finetune(small, train, teacher=model, steps=steps)
        posthoc_s = time.perf_counter() - t0
        kept = ts.count_params(small) - (base["params"] - fc)
        row = {"keep": keep, "rank": r, "fc_kept": kept / fc, "posthoc_0": acc0, "posthoc": accuracy(tuned, test),
               "posthoc_s": posthoc_s, "modes": sorted({m.mode for m in small.modules() if isinstance(m, TTLinear)})}
        for label, shuffle in (("scratch", None), ("shuffled", 7)):
            plan_s, _ = fc_plan(model, keep, shuffle)
            t0 = time.perf_counter()
            fresh = ts.tensorize(model, plan_s, init="random", seed=0)
            trained, _ = ts.train(fresh, train, epochs=epochs, optimizer="adam", lr=1e-3)
            row[label] = accuracy(trained, test)
            row[label + "_s"] = time.perf_counter() - t0
        rows.append(row)
        print(row, flush=True)
    return rows, base


def mlp_table(rows: list[dict], base: dict) -> str:
    head = ("| fc params kept | TT bond rank | post-hoc: compress | post-hoc: + finetune | from scratch: "
            "tensorize + train | from scratch, shuffled (RsTD) | time post-hoc / scratch / shuffled |\n"
            "|---:|---:|---:|---:|---:|---:|---|\n")
    body = ""
    for r in rows:
        body += (f"| {r['fc_kept']:.1%} ({1 / r['fc_kept']:.0f}x) | {r['rank']} | {r['posthoc_0']:.1%} | "
                 f"{r['posthoc']:.1%} | {r['scratch']:.1%} | {r['shuffled']:.1%} | {fmt_s(r['posthoc_s'])} / "
                 f"{fmt_s(r['scratch_s'])} / {fmt_s(r['shuffled_s'])} |\n")
    return head + body


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and epochs (a smoke run)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs in (b) (default 10; quick 2)")
    ap.add_argument("--skip-mlp", action="store_true", help="run (a) only")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = report.load_average()
    t_start = time.perf_counter()
    rounds, min_time = (3, 0.01) if args.quick else (7, 0.05)
    rows = layer_rows((256, 1024, 4096), (1, 32, 128), (4, 16), rounds, min_time,
                      () if args.quick else LARGE_BONDS)
    passed = sum(r["auto_vs_faster"] <= 1.10 for r in rows)
    epochs = args.epochs or (2 if args.quick else 10)
    mlp = None if args.skip_mlp else mlp_rows(epochs)
    total = time.perf_counter() - t_start
    text = f"## {SECTION}\n\n"
    text += (f"`python bench/tensorized_layers.py{' --quick' if args.quick else ''}` on {platform.machine()} "
             f"{platform.system()}, {torch.get_num_threads()} intra-op thread(s); torch {torch.__version__}; load average "
             f"at start {load0}, at end {report.load_average()}; total {total:.0f} s.\n\n")
    threads = torch.get_num_threads()
    text += ("### (a) TTLinear: sweep, rebuild and the automatic mode\n\n"
             f"Forward of an n x n TT layer (`tt_shapes`: 4 cores; the last rows are the two 4x-compressed "
             "4096 x 4096 layers of the tensorly-torch comparison, whose sweep ran 64-128x slower than dense at "
             f"batch 128), `torch.inference_mode`, {threads} thread(s); each "
             f"module timed once per round, round-robin, {rounds} rounds, median; ratios to `nn.Linear(n, n)` "
             "in the same rounds. FLOP ratios from `FlopCounterMode` for the same call. \"auto picks\" is the "
             "mode `TTLinear(..., batch=<batch>)` chooses (`tt_linear_mode`: each mode's FLOPs + "
             f"{ELEMENT_COST:g} x elements its kernels read and write + {CALL_COST:.3g} x kernel calls, "
             "`tensorscope.tt_layers.choose_mode`); \"auto / faster\" is that mode's time over the faster "
             "mode's.\n\n")
    text += layer_table(rows)
    text += (f"\nTarget (auto within 10% of the faster mode in every case): **{'met' if passed == len(rows) else 'missed'}** "
             f"({passed} of {len(rows)} cases).")
    misses = [r for r in rows if r["auto_vs_faster"] > 1.10]
    if misses:
        text += " Misses: " + "; ".join(
            f"n={r['n']} bonds {r['ranks']} batch {r['batch']} (picked {r['pick']}: {r['auto_vs_faster']:.2f}x the "
            "faster mode)" for r in misses) + "."
    big = [r for r in rows if r["batch"] == 128]
    text += (f" At batch 128 the automatic mode ran {min(r['auto'] for r in big):.2f}-{max(r['auto'] for r in big):.2f}x "
             f"the dense layer's time over these layers, the sweep alone up to {max(r['sweep'] for r in big):.1f}x. "
             "Neither mode is faster than dense at batch 128 except a sweep at small bonds; at batch 1 the sweep of a "
             "large layer is (it reads far fewer numbers than the dense weight).\n")
    if mlp is not None:
        mrows, base = mlp
        text += ("\n### (b) mlp: post-hoc TT versus training TT layers from scratch\n\n"
                 f"The trained mlp: {base['acc']:.1%} on the 1000 test digits, {base['params']:,} parameters. "
                 f"`fc1` and `fc2` become TT with one uniform bond rank; `fc3` stays dense. {epochs} epochs = "
                 f"{base['steps']} optimizer steps at batch 128 for every column that trains (`ts.finetune` may stop "
                 "early on its held-out batch). Post-hoc fine-tuning: teacher = the trained mlp plus labels, "
                 "default lr. From scratch: `ts.train(..., optimizer='adam', lr=1e-3)` on labels; shuffled = the "
                 "same plan with `\"shuffle\": 7`. One seed (one run per cell; the binomial standard error of one "
                 "accuracy near 95% on 1000 digits is about 0.7 point).\n\n")
        text += mlp_table(mrows, base)
        for r in mrows:
            text += (f"\nAt {1 / r['fc_kept']:.0f}x fewer fc parameters: from scratch {r['scratch']:.1%} against "
                     f"post-hoc {r['posthoc']:.1%} after fine-tuning ({(r['scratch'] - r['posthoc']) * 100:+.1f} "
                     f"points), shuffled {(r['shuffled'] - r['scratch']) * 100:+.1f} points against unshuffled.")
        text += "\n"
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
