"""Benchmark: server-side latency of the explorer, measured on its state object.

For each built-in example (``lenet5``, ``mlp``, ``resnet8``), on the example's 1000
held-out images:

* **rank change**: ``set_layer`` (plan, parameter and FLOP counts, table) plus
  ``spectrum_data`` (the spectrum plot's arrays) for an ``svd`` rank on every layer; median
  over ranks and layers, and the slowest layer's median. Target: under 50 ms. No SVD or
  factorization may run (checked with the factor cache's miss count);
* **accuracy refresh**: ``refresh_quality`` after an ``svd`` rank change of one layer, for the
  first decomposable layer and the largest one. *Incremental* re-runs the network from the
  activations recorded at that layer's input (the path a slider drag takes); *full* runs the
  whole network (what any change costs without those activations). Target: under 0.5 s;
* **baseline**: one dense forward pass of the original network over the same 1000 images
  (in chunks of 250, as the preview runs), measured before and after the refreshes (the
  smaller median is kept); refresh times are also given as a ratio to it;
* **load**: ``ExplorerState.load_example`` with the weights in the disk cache but cold
  in-process caches (spectra, factors), again warm (a second session of the same server),
  and, with ``--train``, from an empty cache folder (training included);
* **first CP rank** (``lenet5`` only): a CP rank the session has not seen runs CP-ALS
  once (then memoised): what a person waits for, with the pending state shown;
* **open ready**: ``open_ready`` after the load, what a new page adds before it shows its
  plan (data-aware mode where the example brings calibration data, the budget planner at 25%);
* **ranks view**: a row's slider moved (``set_rank_values``) plus ``rank_rows`` (what the
  ranks view re-reads for every row), for an ``svd`` rank of every layer. Target: 50 ms;
* **compare view**: two pinned points of the history side by side (``comparison``: per-layer
  ranks, per-class accuracy, changed samples) plus the PNGs of the changed samples shown.

Run from the repository root::

    python bench/explorer_latency.py [--repeats N] [--train] [--no-write]

It writes the section "Explorer latency" of ``docs/benchmarks.md`` (other sections are left
as they are). Timings are medians of repeats; on a shared machine read the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tensorscope import examples  # noqa: E402
from tensorscope import explorer as X  # noqa: E402
from tensorscope._cache import factor_cache  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "Explorer latency"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ranks_for(top: int) -> list[int]:
    return sorted({max(1, int(top * f)) for f in (0.9, 0.6, 0.4, 0.25, 0.1, 0.05)}, reverse=True)


def bench_example(name: str, repeats: int, train: bool) -> dict:
    out: dict = {"name": name}
    # -- load: disk cache, cold process caches; then warm (another session)
    examples.load_example(name)  # make sure the disk cache holds it
    X._example_memo.clear()
    factor_cache.clear()
    t0 = time.perf_counter()
    s = X.ExplorerState()
    assert s.load_example(name), s.error
    out["load_cold"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    s2 = X.ExplorerState()
    assert s2.load_example(name), s2.error
    out["load_warm"] = 1e3 * (time.perf_counter() - t0)
    s2.close()
    if train:
        with tempfile.TemporaryDirectory() as tmp:
            X._example_memo.clear()
            old = os.environ.get("TENSORSCOPE_CACHE_DIR")
            os.environ["TENSORSCOPE_CACHE_DIR"] = tmp
            try:
                t0 = time.perf_counter()
                s3 = X.ExplorerState()
                assert s3.load_example(name), s3.error
                out["load_train"] = 1e3 * (time.perf_counter() - t0)
                s3.close()
            finally:
                if old is None:
                    os.environ.pop("TENSORSCOPE_CACHE_DIR", None)
                else:
                    os.environ["TENSORSCOPE_CACHE_DIR"] = old
                X._example_memo.clear()
    out["params"] = s.cost["params"]
    out["layers"] = len(s.layer_names)
    # -- what a new page adds: data-aware mode (with calibration data) and the budget plan
    t0 = time.perf_counter()
    assert s.open_ready(), s.error
    out["open_ready"] = 1e3 * (time.perf_counter() - t0)
    out["open_aware"] = s.calibrate
    s2 = X.ExplorerState()  # another page of the same server: the example's calibration results are shared
    assert s2.load_example(name), s2.error
    t0 = time.perf_counter()
    assert s2.open_ready(), s2.error
    out["open_ready_warm"] = 1e3 * (time.perf_counter() - t0)
    s2.close()
    if s.calibrate:
        assert s.set_calibrate(False), s.error  # the timings below are the weights-only ones, as before
    s.set_plan({})

    # -- baseline: one dense forward over the same images
    x = s.eval_inputs
    model = s.model
    def forward_ms() -> float:
        with torch.inference_mode():
            model(x[:10])
            return median_ms(lambda: [model(x[i:i + X.CHUNK]) for i in range(0, len(x), X.CHUNK)], max(repeats, 5))

    fwd_before = forward_ms()

    # -- rank change: counts and spectrum data, never a factorization
    misses = factor_cache.misses
    per_layer = {}
    for layer in s.layer_names:
        top = s.layer_info(layer).max_rank["svd"]
        s.set_layer(layer, "svd", top, refresh=False)
        times = []
        for r in ranks_for(top) * max(1, repeats // 2):
            t0 = time.perf_counter()
            s.set_layer(layer, "svd", r, refresh=False)
            s.spectrum_data(layer)
            times.append(time.perf_counter() - t0)
        per_layer[layer] = 1e3 * statistics.median(times)
        s.set_layer(layer, "dense", refresh=False)
    assert factor_cache.misses == misses, "a rank change factorized something"
    out["rank_change"] = statistics.median(per_layer.values())
    slow = max(per_layer, key=per_layer.get)
    out["rank_change_max"] = (slow, per_layer[slow])

    # -- the ranks view: a row's slider, and the rows it re-reads
    per_layer = {}
    for layer in s.layer_names:
        top = s.layer_info(layer).max_rank["svd"]
        s.set_layer(layer, "svd", top, refresh=False)
        times = []
        for r in ranks_for(top) * max(1, repeats // 2):
            t0 = time.perf_counter()
            s.set_rank_values(layer, [r], refresh=False)
            s.rank_rows()
            times.append(time.perf_counter() - t0)
        per_layer[layer] = 1e3 * statistics.median(times)
    assert factor_cache.misses == misses, "a rank change factorized something"
    out["ranks_view"] = statistics.median(per_layer.values())
    slow = max(per_layer, key=per_layer.get)
    out["ranks_view_max"] = (slow, per_layer[slow])
    s.set_plan({})

    # -- accuracy refresh after one layer's rank change
    s.set_plan({})
    largest = max(s.layer_names, key=lambda n: s.layer_info(n).params)
    refresh = {}
    for which, layer in (("first", s.layer_names[0]), ("largest", largest)):
        top = s.layer_info(layer).max_rank["svd"]
        ranks = ranks_for(top)
        s.set_layer(layer, "svd", ranks[0])  # records the activations feeding this layer
        inc, full = [], []
        for _ in range(repeats):
            for r in ranks[1:]:
                s.set_layer(layer, "svd", r, refresh=False)
                t0 = time.perf_counter()
                q = s.refresh_quality()
                inc.append(time.perf_counter() - t0)
                kind = q["run"]
                # the same plan without recorded activations: the whole network runs (and
                # records them again for the next incremental step)
                t0 = time.perf_counter()
                assert s.refresh_quality(incremental=False)["run"] == "full"
                full.append(time.perf_counter() - t0)
        refresh[which] = (layer, kind, 1e3 * statistics.median(inc), 1e3 * statistics.median(full))
        s.set_plan({})
    out["refresh"] = refresh

    # -- the compare view: two pinned points of the history side by side, with sample images
    s.set_layer(largest, "svd", ranks_for(s.layer_info(largest).max_rank["svd"])[1])
    a = s.pin()
    s.set_layer(largest, "svd", 1)
    b = s.pin()
    times, changed = [], 0
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        cmp = s.comparison(a, b)
        if cmp["images"]:
            for item in cmp["changed"]["shown"]:
                s.sample_png(item["index"])
        times.append(time.perf_counter() - t0)
        changed = cmp["changed"]["total"]
    out["compare"] = (1e3 * statistics.median(times), changed, cmp["images"])
    s.set_plan({})
    # the baseline again, after: on a shared machine the smaller of the two is the machine's speed
    out["forward"] = min(fwd_before, forward_ms())

    # -- a CP rank never seen before: CP-ALS once, then memoised
    if name == "lenet5":
        factor_cache.clear()
        s.set_layer("features.3", "cp", 24, refresh=False)
        t0 = time.perf_counter()
        s.refresh_quality()
        out["cp_first"] = 1e3 * (time.perf_counter() - t0)
        s.set_layer("features.3", "cp", 20, refresh=False)
        s.refresh_quality()
        s.set_layer("features.3", "cp", 24, refresh=False)
        t0 = time.perf_counter()
        s.refresh_quality()
        out["cp_again"] = 1e3 * (time.perf_counter() - t0)
    s.close()
    return out


def fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else (f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms")


def render(results: list[dict], meta: dict) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"`python bench/explorer_latency.py` on {meta['machine']}; torch {meta['torch']}, "
        f"{meta['threads']} intra-op thread(s); load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}. Medians of {meta['repeats']} repeats, measured on `ExplorerState` (server side, "
        "no browser). Evaluation data: the example's 1000 held-out images. Ratios are to one dense forward "
        f"pass of the original network over the same 1000 images (in chunks of {X.CHUNK}, as the preview runs), "
        "measured in the same run.",
        "",
        "### A rank change and an accuracy refresh",
        "",
        "Rank change = `set_layer` (plan, parameter/FLOP counts, table) + `spectrum_data` (the spectrum "
        "plot's arrays) for an `svd` rank; no factorization runs (checked). Refresh = `refresh_quality` after "
        "one layer's rank changed: *incremental* re-runs the network from the activations recorded at that "
        "layer's input (what a slider drag costs), *full* runs all of it. Targets: 50 ms and 0.5 s.",
        "",
        "| network | params | dense forward (1000 images) | rank change, median (slowest layer) "
        "| refresh, first layer: incremental / full | refresh, largest layer: incremental / full |",
        "|---|---:|---:|---|---|---|",
    ]
    views = [
        "",
        "### The ranks view and the compare view",
        "",
        "Ranks view = a row's slider moved (`set_rank_values`, an `svd` rank) + `rank_rows` (every row's "
        "method, axes and values, what the view re-reads); target 50 ms. Compare view = `comparison` of two "
        "pinned points of the history (per-layer ranks, per-class accuracy, the samples whose prediction "
        "changed: all recorded when each was evaluated) + the PNGs of the changed samples shown.",
        "",
        "| network | ranks view, median (slowest layer) | compare view (changed samples) |",
        "|---|---|---|",
    ]
    for r in results:
        sl, sms = r["ranks_view_max"]
        cms, changed, images = r["compare"]
        views.append(f"| {r['name']} | {fmt_ms(r['ranks_view'])} ({fmt_ms(sms)}, `{sl}`) | {fmt_ms(cms)} "
                     f"({changed} changed{', with images' if images else ''}) |")
    for r in results:
        fwd = r["forward"]
        sl, sms = r["rank_change_max"]
        cells = []
        for which in ("first", "largest"):
            layer, kind, inc, full = r["refresh"][which]
            cells.append(f"`{layer}`: {fmt_ms(inc)} ({inc / fwd:.2f}x fwd) / {fmt_ms(full)} ({full / fwd:.2f}x)")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {fmt_ms(fwd)} | {fmt_ms(r['rank_change'])} "
                     f"({fmt_ms(sms)}, `{sl}`) | {cells[0]} | {cells[1]} |")
    lines += views
    lines += [
        "",
        "### Loading an example",
        "",
        "Disk cache = weights already trained and cached, empty in-process caches (inspect, every spectrum "
        "and error curve, the original's outputs on the evaluation data). Warm = a second session of the same "
        "server (spectra cached by weight hash). Open ready = what a new page adds after the load before it "
        "shows its plan (`open_ready`: the data-aware mode where the example brings calibration data, the "
        "budget planner at 25%, the plan's accuracy), for the server's first page and for a later one (the "
        "example's calibration statistics, whitened spectra and data-aware budget plans are shared)."
        + (" Train = empty cache folder: training included." if meta["train"] else ""),
        "",
        "| network | layers | load (disk cache) | load (warm) | open ready: first page / later |"
        + (" load (train) |" if meta["train"] else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if meta["train"] else ""),
    ]
    for r in results:
        aware = " (data-aware)" if r["open_aware"] else ""
        row = (f"| {r['name']} | {r['layers']} | {fmt_ms(r['load_cold'])} | {fmt_ms(r['load_warm'])} | "
               f"{fmt_ms(r['open_ready'])} / {fmt_ms(r['open_ready_warm'])}{aware} |")
        if meta["train"]:
            row += f" {fmt_ms(r['load_train'])} |"
        lines.append(row)
    cp = next((r for r in results if "cp_first" in r), None)
    if cp:
        lines += ["", f"A CP rank not seen before (`features.3` of lenet5, rank 24, full CP-ALS) takes "
                      f"{fmt_ms(cp['cp_first'])} to refresh, off the event loop with the accuracy shown as "
                      f"pending; the same rank again {fmt_ms(cp['cp_again'])} (memoised)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train", action="store_true", help="also time loading with training (minutes)")
    ap.add_argument("--examples", nargs="*", default=examples.list_examples())
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU(s)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_start": report.load_average(), "repeats": args.repeats,
            "train": args.train}
    results = []
    for name in args.examples:
        print(f"{name} ...", flush=True)
        results.append(bench_example(name, args.repeats, args.train))
    meta["load_end"] = report.load_average()
    text = render(results, meta)
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
