"""Benchmark: tensorscope versus tensorly / tensorly-torch, and factorized versus dense layers.

Five measurements, each with its baseline measured in the same run (read the ratios: the
machine is shared):

1. **Decomposition time and error** of a 256x256x3x3 and a 512x512x3x3 conv weight and a
   4096x4096 Linear weight (seeded random weights given a decaying spectrum: a Gaussian
   tensor multiplied along its output and input modes by ``Q diag(k^-0.6)``, Q random
   orthogonal), at equal parameter counts: tensorscope's ``svd``, ``tucker2``, ``cp``, ``tt``
   (cold factor cache) versus ``torch.linalg.svd`` truncation, tensorly's ``tucker`` /
   ``partial_tucker`` (HOOI), ``parafac`` and ``tensor_train``, and tensorly-torch's
   ``FactorizedConv.from_conv`` / ``FactorizedLinear.from_linear``. CP-ALS is capped at the
   same number of iterations everywhere. Also the time of a second rank of an already
   factorized layer (factor cache warm) against the first.
2. **Inference latency** on CPU of dense, tensorscope and tensorly-torch layers at about 4x and
   10x fewer parameters (conv 256x256x3x3 on a 32x256x32x32 batch, Linear 4096x4096 on 128
   rows), one intra-op thread and torch's default, as ratios to the dense layer timed in the
   same round, next to the FLOP ratio (``FlopCounterMode``). channels_last, and torch.compile in
   a child process when it compiles quickly.
3. **Accuracy at equal budget** on the built-in ``lenet5`` and ``mlp``: tensorly-torch with one
   uniform rank fraction for every layer (its own decomposition, sized by bisection to the
   target parameter count) versus ``ts.plan_for_budget`` + ``ts.compress``, without and with
   calibration data. No fine-tuning.
4. **Peak memory** of all spectra of the 11M ResNet-18-style net (``bench/nets.py``) in a fresh
   child process, as a multiple of the model's size.
5. **Scale**: ``ts.inspect`` plus all spectra of that net at 1M, 11M and 100M parameters
   (widths scaled), against the LAPACK work predicted for the same layers, and of chains of
   many small layers.

Run from the repository root::

    python bench/versus_tltorch.py [--quick] [--threads N] [--no-write]

It writes the section "Versus tensorly-torch and dense layers" of ``docs/benchmarks.md``
(other sections are left as they are). Sections 1, 3, 4, 5 run with one intra-op thread by
default (``--threads``): on a shared 2-core machine MKL's LAPACK with 2 threads was 5-20x
slower than with one (oversubscription).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
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
from torch import nn  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # before anything changes it

import tensorly as tl  # noqa: E402
import tltorch  # noqa: E402  (sets tensorly's backend to pytorch)
from tensorly.decomposition import parafac, partial_tucker, tensor_train, tucker  # noqa: E402

import tensorscope as ts  # noqa: E402
from tensorscope._cache import factor_cache  # noqa: E402
from tensorscope.methods import LayerGeometry, get_method  # noqa: E402
import report  # noqa: E402
from tensorscope.methods.tucker2 import DEFAULT_SWEEPS as TUCKER_SWEEPS  # noqa: E402

tl.set_backend("pytorch")

SECTION = "Versus tensorly-torch and dense layers"
DOC = ROOT / "docs" / "benchmarks.md"
ALPHA = 0.6  # decay exponent of the synthetic weights' mode scales


# ---- helpers ------------------------------------------------------------------------------


def fmt_s(s: float) -> str:
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def npar(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def timed(fn, setup=None, budget: float = 4.0, max_repeats: int = 5) -> tuple[float, int, object]:
    """Median time of ``fn`` (``setup`` untimed before each run) and the last result.

    Repeats while the total stays under ``budget`` seconds: one run for slow calls, up to
    ``max_repeats`` for fast ones.
    """
    times, out = [], None
    while True:
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= max_repeats or sum(times) + times[-1] > budget:
            break
    return statistics.median(times), len(times), out


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def decaying(shape, seed: int = 0) -> torch.Tensor:
    """A Gaussian tensor scaled along modes 0 and 1 by ``Q diag(k^-ALPHA)`` (Q random orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    for mode in (0, 1):
        n = shape[mode]
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        d = torch.arange(1, n + 1, dtype=torch.float32) ** -ALPHA
        w = torch.movedim(torch.tensordot(q * d, torch.movedim(w, mode, 0), dims=1), 0, mode)
    return (w / w.norm() * math.sqrt(shape[0])).contiguous()


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float((approx.to(ref.dtype) - ref).norm() / ref.norm())


def closest_rank(method, geom, target: int, ranks, options=None):
    return min(ranks, key=lambda r: abs(method.count_params(geom, r, options) - target))


def flops_of(mod: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``mod(x)`` as ``FlopCounterMode`` counts them, run on the meta device (no arithmetic).

    At the real batch size: tltorch's einsum contractions pick their order by shape, so a count
    per sample would not be the work done on a batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(mod).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        meta(torch.empty(x.shape, device="meta"))
    return fc.get_total_flops()


# ---- 1. decomposition time ------------------------------------------------------------------

def tt_tensor_of(layer: nn.Module, in_shape, out_shape) -> torch.Tensor:
    """The weight reshaped and permuted exactly as tensorscope's ``tt`` factorizes it."""
    w = layer.weight.detach()
    d = len(in_shape)
    inter = [i for k in range(d) for i in (k, d + k)]
    modes = [m * n for m, n in zip(out_shape, in_shape)]
    if isinstance(layer, nn.Linear):
        return w.reshape(*out_shape, *in_shape).permute(*inter).reshape(modes)
    khw = w.shape[2] * w.shape[3]
    return w.reshape(*out_shape, *in_shape, khw).permute(2 * d, *inter).reshape([khw] + modes)


SECOND: list[dict] = []  # second-rank timings, filled by ts_row


def ts_row(method: str, layer, rank, options=None, budget=4.0, max_repeats=5, second=None, case="") -> dict:
    """tensorscope at ``rank`` with a cold cache; then, cache warm, at rank ``second`` (if given)."""
    m = get_method(method)
    t, n, f = timed(lambda: m.factorize(layer, rank, options, refine=True), setup=factor_cache.clear,
                    budget=budget, max_repeats=max_repeats)
    row = {"impl": f"tensorscope `{method}`", "rank": rank, "time": t, "n": n,
           "err": rel_err(m.reconstruct(layer, f), layer.weight.detach()),
           "params": m.count_params(LayerGeometry.of(layer), rank, options), "ts": True}
    if second is not None:
        for refine in ((True, False) if method == "tucker2" else (True,)):
            if refine:
                first = t  # the cache now holds what the last cold repeat computed
            else:
                first, _, _ = timed(lambda: m.factorize(layer, rank, options, refine=False),
                                    setup=factor_cache.clear, budget=budget, max_repeats=max_repeats)
                m.factorize(layer, rank, options, refine=False)
            t2, _, _ = timed(lambda: m.factorize(layer, second, options, refine=refine), budget=budget,
                             max_repeats=max_repeats)
            SECOND.append({"method": method, "refine": refine, "a": rank, "b": second, "first": first,
                           "second": t2, "layer": case})
    return row


def bench_decomposition(case: str, layer: nn.Module, tucker_rank: int, cp_iters: int, budget: float,
                        cp_second: bool = False) -> list[dict]:
    """All methods and baselines on one layer, at the parameter count of Tucker-2 (r, r)."""
    w = layer.weight.detach()
    geom = LayerGeometry.of(layer)
    conv = isinstance(layer, nn.Conv2d)
    o, i = w.shape[0], w.shape[1]
    if conv:
        target = get_method("tucker2").count_params(geom, (tucker_rank, tucker_rank))
    else:
        target = round(geom.dense_params / 8.5)
    rows: list[dict] = []
    grp = lambda name, rs: [dict(r, group=name) for r in rs]  # noqa: E731

    # -- svd
    svd = get_method("svd")
    r = closest_rank(svd, geom, target, range(1, svd.max_rank(geom) + 1))
    mat = w.reshape(o, -1)

    def torch_svd():
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r]

    t, n, (a, b) = timed(torch_svd, budget=budget)
    base = {"impl": "`torch.linalg.svd` + truncation", "rank": r, "time": t, "n": n,
            "err": rel_err(a @ b, mat), "params": r * (mat.shape[0] + mat.shape[1]), "baseline": True}
    rs = [base, ts_row("svd", layer, r, budget=budget, second=r // 2, case=case)]
    if not conv:
        t, n, (u, s, v) = timed(lambda: torch.svd_lowrank(mat, q=r + 10, niter=2), budget=budget)
        rs.append({"impl": "`torch.svd_lowrank` (randomized, q=r+10, 2 power its; one rank only)", "rank": r,
                   "time": t, "n": n, "err": rel_err((u[:, :r] * s[:r]) @ v[:, :r].T, mat),
                   "params": base["params"]})
    rows += grp("svd", rs)
    print(f"  {case} svd done", flush=True)

    if conv:
        # -- tucker2 (HOOI is tensorly's tucker with full spatial rank; partial_tucker on modes 0, 1)
        rk = (tucker_rank, tucker_rank)
        rs = []
        t, n, tk = timed(lambda: tucker(w, rank=[*rk, *w.shape[2:]]), budget=budget)
        rs.append({"impl": "tensorly `tucker` (HOOI, defaults: svd init, <=100 its, tol 1e-4)", "rank": rk,
                   "time": t, "n": n, "err": rel_err(tl.tucker_to_tensor(tk), w), "params": target,
                   "baseline": True})
        t, n, ((core, fac), _) = timed(lambda: partial_tucker(w, rank=list(rk), modes=[0, 1]), budget=budget)
        rs.append({"impl": "tensorly `partial_tucker` (HOOI on modes 0, 1)", "rank": rk, "time": t, "n": n,
                   "err": rel_err(tl.tenalg.multi_mode_dot(core, fac, modes=[0, 1]), w), "params": target})
        t, n, lt = timed(lambda: tltorch.FactorizedConv.from_conv(
            layer, rank=(*rk, *w.shape[2:]), factorization="tucker", implementation="factorized"), budget=budget)
        rs.append({"impl": "tltorch `FactorizedConv.from_conv` (tucker)", "rank": rk, "time": t, "n": n,
                   "err": rel_err(lt.weight.to_tensor(), w), "params": npar(lt)})
        rs.append(ts_row("tucker2", layer, rk, budget=budget, second=(3 * tucker_rank // 4,) * 2, case=case))
        rows += grp("tucker2", rs)
        print(f"  {case} tucker2 done", flush=True)

        # -- cp, all capped at cp_iters ALS iterations
        cp = get_method("cp")
        R = closest_rank(cp, geom, target, range(1, 4 * tucker_rank * 4))
        rs = []
        t, n, cpt = timed(lambda: parafac(w, R, n_iter_max=cp_iters, init="svd"), budget=budget, max_repeats=3)
        rs.append({"impl": f"tensorly `parafac` (svd init, {cp_iters} its)", "rank": R, "time": t, "n": n,
                   "err": rel_err(tl.cp_to_tensor(cpt), w), "params": R * sum(w.shape), "baseline": True})
        t, n, lc = timed(lambda: tltorch.FactorizedConv.from_conv(
            layer, rank=R, factorization="cp", implementation="factorized",
            decomposition_kwargs={"n_iter_max": cp_iters}), budget=budget, max_repeats=3)
        rs.append({"impl": f"tltorch `FactorizedConv.from_conv` (cp, {cp_iters} its)", "rank": R, "time": t,
                   "n": n, "err": rel_err(lc.weight.to_tensor(), w), "params": npar(lc)})
        row = ts_row("cp", layer, R, {"iters": cp_iters}, budget=budget, max_repeats=3,
                     second=(3 * R) // 4 if cp_second else None, case=case)
        row["impl"] += f" ({cp_iters} its)"
        rs.append(row)
        rows += grp("cp", rs)
        print(f"  {case} cp done", flush=True)

    # -- tt: tensorscope's default shapes; tensorly's tensor_train on the same tensor and ranks
    tt = get_method("tt")
    inner = max(tt.max_rank(geom)[1:-1])
    r = closest_rank(tt, geom, target, range(1, inner + 1))
    ranks = tt.resolve_rank(geom, r)
    f0 = tt.factorize(layer, ranks)
    in_shape, out_shape = f0.meta["in_shape"], f0.meta["out_shape"]
    rs = []
    t, n, tt_t = timed(lambda: tensor_train(tt_tensor_of(layer, in_shape, out_shape), list(ranks)), budget=budget)
    ref = tt_tensor_of(layer, in_shape, out_shape)
    rs.append({"impl": "tensorly `tensor_train` (same tensor and bonds)", "rank": ranks, "time": t, "n": n,
               "err": rel_err(tl.tt_to_tensor(tt_t), ref), "params": tt.count_params(geom, ranks), "baseline": True})
    frac = target / geom.dense_params
    if conv:
        t, n, lt = timed(lambda: tltorch.FactorizedConv.from_conv(
            layer, rank=frac, factorization="tt", implementation="factorized"), budget=budget)
        rs.append({"impl": "tltorch `FactorizedConv.from_conv` (tt, its own layout)", "rank": tuple(lt.rank),
                   "time": t, "n": n, "err": rel_err(torch.movedim(lt.weight.to_tensor(), -1, 0), w),
                   "params": npar(lt)})
    else:
        t, n, lt = timed(lambda: tltorch.FactorizedLinear.from_linear(
            layer, rank=frac, factorization="blocktt", implementation="factorized", bias=False), budget=budget)
        rs.append({"impl": "tltorch `FactorizedLinear.from_linear` (blocktt, 3 modes)", "rank": tuple(lt.rank),
                   "time": t, "n": n, "err": rel_err(lt.weight.to_matrix(), w), "params": npar(lt)})
    # a second TT rank redoes the whole TT-SVD (nothing is cached): measured on convs only, where it is cheap
    rs.append(ts_row("tt", layer, ranks, budget=budget, second=max(1, r // 2) if conv else None, case=case))
    rows += grp("tt", rs)
    print(f"  {case} tt done", flush=True)
    for row in rows:
        row["case"] = case
    return rows


# ---- 2. latency -----------------------------------------------------------------------------

def randomize(mod: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.02)
    return mod.eval()


def conv_variants(shrink: int) -> list[tuple[str, nn.Module]]:
    c = nn.Conv2d(256, 256, 3, padding=1, bias=True)
    geom = LayerGeometry.of(c)
    target = geom.dense_params / shrink
    out = []
    for name, ranks in (("svd", range(1, 257)), ("tucker2", [(r, r) for r in range(1, 257)]),
                        ("cp", range(1, 3000))):
        m = get_method(name)
        r = closest_rank(m, geom, target, ranks)
        out.append((f"tensorscope `{name}` {list(r) if isinstance(r, tuple) else r}", randomize(m.skeleton(c, r))))
    frac = 1.0 / shrink
    for fact in ("tucker", "cp", "tt"):
        kw = {"fixed_rank_modes": "spatial"} if fact == "tucker" else {}
        lt = tltorch.FactorizedConv(256, 256, (3, 3), factorization=fact, rank=frac, implementation="factorized",
                                    padding=1, bias=True, **kw)
        lt.reset_parameters()
        out.append((f"tltorch {fact} {list(lt.rank) if fact != 'cp' else lt.rank}", lt.eval()))
    return out


def linear_variants(shrink: int, tt3: bool) -> list[tuple[str, nn.Module]]:
    from tltorch.utils import get_tensorized_shape

    lin = nn.Linear(4096, 4096)
    geom = LayerGeometry.of(lin)
    target = geom.dense_params / shrink
    out = []
    svd = get_method("svd")
    r = closest_rank(svd, geom, target, range(1, 4097))
    out.append((f"tensorscope `svd` {r}", randomize(svd.skeleton(lin, r))))
    tt = get_method("tt")
    r = closest_rank(tt, geom, target, range(1, 4097))
    out.append((f"tensorscope `tt` {list(tt.resolve_rank(geom, r))}", randomize(tt.skeleton(lin, r))))
    if tt3:  # the same 3-mode layout as tltorch's BlockTT (16x16x16)
        o3 = {"in_shape": [16, 16, 16], "out_shape": [16, 16, 16]}
        r = closest_rank(tt, geom, target, range(1, max(tt.max_rank(geom, o3)) + 1), o3)
        r = tt.resolve_rank(geom, r, o3)
        out.append((f"tensorscope `tt` {list(r)} (16x16x16)", randomize(tt.skeleton(lin, r, o3))))
    i_sh, o_sh = get_tensorized_shape(4096, 4096, order=3, min_dim=2, verbose=False)
    for fact in ("blocktt", "tucker"):
        lt = tltorch.FactorizedLinear(i_sh, o_sh, bias=True, factorization=fact, rank=1.0 / shrink,
                                      implementation="factorized")
        lt.reset_parameters()
        out.append((f"tltorch {fact} {list(lt.rank)}", lt.eval()))
    return out


def interleaved(mods: dict, xs: dict, base, rounds: int, slow_rounds: int = 3) -> dict:
    """Round-robin timing; per round each module's time over the base module's; medians.

    A module more than 10x slower than the base in its warm-up takes part in the first
    ``slow_rounds`` rounds only (its ratio is still to the base's time in the same round).
    """
    times = {k: [] for k in mods}
    warm = {}
    with torch.inference_mode():
        for k, m in mods.items():
            t0 = time.perf_counter()
            m(xs[k])  # warm-up
            warm[k] = time.perf_counter() - t0
        slow = {k for k in mods if warm[k] > 10 * warm[base]}
        for i in range(rounds):
            for k, m in mods.items():
                if k in slow and i >= slow_rounds:
                    times[k].append(None)
                    continue
                x = xs[k]
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    ratios = {k: statistics.median(a / b for a, b in zip(times[k], times[base]) if a is not None) for k in mods}
    return {"ratio": ratios, "time": {k: statistics.median(a for a in v if a is not None) for k, v in times.items()},
            "rounds": {k: sum(a is not None for a in v) for k, v in times.items()}}


def bench_latency(threads_list: list[int], rounds: int, channels_last: bool, tt3: bool) -> dict:
    torch.manual_seed(0)
    res = {"conv": {}, "linear": {}}
    xc = torch.randn(32, 256, 32, 32)
    xl = torch.randn(128, 4096)
    dense_c = randomize(nn.Conv2d(256, 256, 3, padding=1, bias=True))
    dense_l = randomize(nn.Linear(4096, 4096))
    fd_c, fd_l = flops_of(dense_c, xc), flops_of(dense_l, xl)
    with quiet():
        conv = {s: conv_variants(s) for s in (4, 10)}
        lin = {s: linear_variants(s, tt3) for s in (4, 10)}
    meta = {"conv": {}, "linear": {}}
    for s in (4, 10):
        for name, m in conv[s]:
            meta["conv"][(s, name)] = {"params": npar(m), "flop_ratio": flops_of(m, xc) / fd_c}
        for name, m in lin[s]:
            meta["linear"][(s, name)] = {"params": npar(m), "flop_ratio": flops_of(m, xl) / fd_l}
    res["dense_params"] = {"conv": npar(dense_c), "linear": npar(dense_l)}
    skip: set = set()
    for th in threads_list:
        torch.set_num_threads(th)
        mods = {("dense",): dense_c}
        xs = {("dense",): xc}
        for s in (4, 10):
            for name, m in conv[s]:
                mods[(s, name)] = m
                xs[(s, name)] = xc
        if channels_last:
            xcl = xc.contiguous(memory_format=torch.channels_last)
            mods[("dense", "cl")] = copy.deepcopy(dense_c).to(memory_format=torch.channels_last)
            xs[("dense", "cl")] = xcl
            for s in (4, 10):
                for name, m in conv[s]:
                    if name.startswith("tensorscope"):
                        mods[(s, name, "cl")] = copy.deepcopy(m).to(memory_format=torch.channels_last)
                        xs[(s, name, "cl")] = xcl
        r = interleaved(mods, xs, ("dense",), rounds)
        res["conv"][th] = r
        print(f"  conv latency, {th} thread(s): dense {fmt_s(r['time'][('dense',)])}", flush=True)
        mods = {("dense",): dense_l}
        xs = {("dense",): xl}
        for s in (4, 10):
            for name, m in lin[s]:
                if (s, name) not in skip:
                    mods[(s, name)] = m
                    xs[(s, name)] = xl
        r = interleaved(mods, xs, ("dense",), max(rounds, 9), slow_rounds=3 if tt3 else 1)
        res["linear"][th] = r
        skip |= {k for k, v in r["ratio"].items() if v > 10}
        print(f"  linear latency, {th} thread(s): dense {fmt_s(r['time'][('dense',)])}", flush=True)
    torch.set_num_threads(threads_list[0])
    res["meta"] = meta
    return res


def _compile_child(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(32, 256, 32, 32)
    dense = randomize(nn.Conv2d(256, 256, 3, padding=1, bias=True))
    fact = randomize(get_method("tucker2").skeleton(dense, (57, 57)))
    out = {}
    mods = {"dense": dense, "tucker2": fact}
    with torch.inference_mode():
        for k, m in list(mods.items()):
            t0 = time.perf_counter()
            cm = torch.compile(m)
            cm(x)
            out[f"compile_{k}"] = time.perf_counter() - t0
            mods[f"{k}_compiled"] = cm
    r = interleaved(mods, {k: x for k in mods}, "dense", 7)
    out["ratio"] = r["ratio"]
    print(json.dumps(out))


def bench_compile(threads: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "compile", "--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"torch.compile did not finish within {timeout:.0f} s (compile plus timing)"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"torch.compile failed: {last[:200]}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t0
    return out


# ---- 3. quality at equal budget -------------------------------------------------------------

def _tl_layer(mod: nn.Module, frac: float, fact: str, meta: bool) -> nn.Module:
    from tltorch.utils import get_tensorized_shape

    if isinstance(mod, nn.Linear):
        if meta:
            i, o = get_tensorized_shape(mod.in_features, mod.out_features, order=3, min_dim=2, verbose=False)
            return tltorch.FactorizedLinear(i, o, bias=mod.bias is not None, factorization=fact, rank=frac,
                                            implementation="factorized", device="meta")
        return tltorch.FactorizedLinear.from_linear(mod, rank=frac, factorization=fact, implementation="factorized",
                                                    bias=mod.bias is not None)
    cf = {"blocktt": "tt"}.get(fact, fact)
    if meta:
        return tltorch.FactorizedConv(mod.in_channels, mod.out_channels, mod.kernel_size, factorization=cf,
                                      rank=frac, implementation="factorized", stride=mod.stride[0],
                                      padding=mod.padding, bias=mod.bias is not None, device="meta")
    return tltorch.FactorizedConv.from_conv(mod, rank=frac, factorization=cf, implementation="factorized")


def tltorch_uniform(model: nn.Module, frac: float, fact: str, meta: bool = False) -> nn.Module:
    """Every Linear/Conv2d replaced by its tltorch factorized layer at rank fraction ``frac``."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1], _tl_layer(mod, frac, fact, meta))
    return m


def tltorch_for_budget(model: nn.Module, keep: float, fact: str) -> tuple[nn.Module, float]:
    """Bisection on tltorch's rank fraction (counted on meta tensors), then a check on real layers.

    tensorly's ``tensor_train`` caps bonds at the unfoldings' ranks, so a built BlockTT can be
    smaller than its meta twin: then a few more bisection steps count the real layers.
    """
    total = npar(model)
    target = keep * total

    def count(f, meta):
        return npar(tltorch_uniform(model, f, fact, meta=meta))

    def search(meta, lo, hi, steps):
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            c = count(mid, meta)
            if best is None or abs(c - target) < abs(best[1] - target):
                best = (mid, c)
            if c > target:
                hi = mid
            else:
                lo = mid
        return best

    f, _ = search(True, 1e-4, 2.0, 24)
    built = tltorch_uniform(model, f, fact)
    if abs(npar(built) - target) > 0.02 * target:
        f, _ = search(False, f * 0.5, min(4.0, f * 4), 8)
        built = tltorch_uniform(model, f, fact)
    return built, f


def bench_quality(names: list[str], keeps: list[float]) -> list[dict]:
    from tensorscope.examples import load_example

    rows = []
    for name in names:
        ex = load_example(name)
        model, test, calib = ex.model.eval(), ex.test_loader(500), ex.calibration()
        total = npar(model)
        dense = ts.evaluate(model, test)["accuracy"]
        for keep in keeps:
            row = {"net": name, "keep": keep, "dense": dense, "params": total}
            with quiet():
                for fact in ("tucker", "blocktt"):
                    t0 = time.perf_counter()
                    small, f = tltorch_uniform_safe(model, keep, fact)
                    if small is None:
                        row[fact] = None
                        continue
                    row[fact] = (ts.evaluate(small, test)["accuracy"], npar(small) / total, f,
                                 time.perf_counter() - t0)
                t0 = time.perf_counter()
                plan = ts.plan_for_budget(model, keep)
                small = ts.compress(model, plan)
                row["ts"] = (ts.evaluate(small, test)["accuracy"], npar(small) / total, time.perf_counter() - t0)
                t0 = time.perf_counter()
                plan_d = ts.plan_for_budget(model, keep, data=calib)
                small = ts.compress(model, plan_d, data=calib)
                row["ts_data"] = (ts.evaluate(small, test)["accuracy"], npar(small) / total, time.perf_counter() - t0)
            rows.append(row)
            print(f"  {name} keep {keep:.0%}: " + ", ".join(
                f"{k} {v[0]:.1%}/{v[1]:.1%}" for k, v in row.items() if isinstance(v, tuple)), flush=True)
    return rows


def tltorch_uniform_safe(model, keep, fact):
    try:
        return tltorch_for_budget(model, keep, fact)
    except Exception as e:  # a rank tltorch cannot build: reported as missing
        print(f"  tltorch {fact} at keep {keep}: {type(e).__name__}: {e}", flush=True)
        return None, None


# ---- 4. peak memory (child process) ---------------------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _memory_child(threads: int) -> None:
    import resource

    torch.set_num_threads(threads)
    from nets import resnet18_cifar

    model = resnet18_cifar()
    mbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    gc.collect()
    before = _status("VmRSS")
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "max_before": max_before, "peak": peak, "model_bytes": mbytes,
                      "reset": reset, "after": _status("VmRSS"), "cache_bytes": factor_cache._bytes,
                      "seconds": seconds}))


def bench_memory(threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "memory", "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- 5. scale ------------------------------------------------------------------------------

class Chain(nn.Module):
    """``n`` Linear(width, width) layers with ReLUs: many small layers."""

    def __init__(self, n: int, width: int = 128):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


def lapack_work(model: nn.Module) -> float:
    """Predicted work of all spectra: sum over layers of m^2 n (m <= n) for both unfoldings."""
    work = 0.0
    for info in ts.inspect(model):
        mod = model.get_submodule(info.name)
        w = mod.weight
        o, i = w.shape[0], w.shape[1]
        k = w[0, 0].numel() if w.dim() == 4 else 1
        for m, n in ((o, i * k), (i, o * k)):
            a, b = min(m, n), max(m, n)
            work += a * a * b
    return work


def bench_scale(mults: list[float], chains: list[int]) -> list[dict]:
    from nets import ResNet18

    rows = []
    nets = [(f"ResNet-18-style, widths x{m:g}", lambda m=m: ResNet18(widths=tuple(
        int(round(c * m)) for c in (64, 128, 256, 512)))) for m in mults]
    nets += [(f"chain of {n} Linear(128, 128)", lambda n=n: Chain(n)) for n in chains]
    for name, build in nets:
        torch.manual_seed(0)
        model = build().eval()
        factor_cache.clear()
        gc.collect()
        t0 = time.perf_counter()
        infos = ts.inspect(model)
        t_inspect = time.perf_counter() - t0
        t0 = time.perf_counter()
        ts.spectra(model)
        t_out = time.perf_counter() - t0
        t0 = time.perf_counter()
        ts.spectra(model, unfolding="in")
        t_in = time.perf_counter() - t0
        rows.append({"name": name, "params": npar(model), "layers": len(infos), "inspect": t_inspect,
                     "out": t_out, "in": t_in, "work": lapack_work(model), "cache": factor_cache._bytes})
        r = rows[-1]
        print(f"  {name}: {r['params'] / 1e6:.2f}M params, {r['layers']} layers, inspect {fmt_s(t_inspect)}, "
              f"spectra {fmt_s(t_out)} + {fmt_s(t_in)}", flush=True)
        del model
        factor_cache.clear()
    return rows


# ---- rendering -----------------------------------------------------------------------------

def yn(ok: bool) -> str:
    return "**pass**" if ok else "**fail**"


def fmt_rank(r) -> str:
    return str(list(r)) if isinstance(r, (tuple, list)) else str(r)


def render(meta: dict, dec: list[dict], second: list[dict], lat: dict, comp: dict | None,
           qual: list[dict], mem: dict, scale: list[dict]) -> str:
    L = [f"## {SECTION}", ""]
    L.append(
        f"`python bench/versus_tltorch.py{' --quick' if meta['quick'] else ''}` on {meta['machine']}; torch "
        f"{meta['torch']}, tensorly {tl.__version__}, tensorly-torch {tltorch.__version__}; {meta['threads']} "
        f"intra-op thread(s) except where the latency tables say otherwise (torch's default here: "
        f"{DEFAULT_THREADS}; in a probe on this shared machine MKL's LAPACK ran 5-20x slower with 2 threads than "
        "with 1); "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}; total {meta['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta["sections"].items()) + "). "
        "Times are medians of repeats (the count is shown where it varies); ratios are to a baseline measured "
        "in the same run.")

    # -- 1
    L += ["", "### Decomposition time and error at equal parameter count", "",
          f"Random weights (seed 0) with a decaying spectrum: a Gaussian tensor multiplied along its output and "
          f"input modes by `Q diag(k^-{ALPHA})` (Q random orthogonal). Ranks are chosen so that every method "
          "keeps about the parameters of Tucker-2 at (64, 64) on 256x256x3x3, (128, 128) on 512x512x3x3 (8.5x "
          "fewer), and 1/8.5 of the 4096x4096 Linear. tensorscope runs with a cold factor cache (cleared "
          f"before every repeat) and `refine=True` (the `compress` default: {TUCKER_SWEEPS} HOOI sweep(s) for Tucker-2). "
          f"CP-ALS is capped at the same iteration count for every implementation of a layer (shown in its rows; "
          "tensorscope's default is 100 iterations; "
          "tensorscope runs it in float64, the others in float32). Error = relative Frobenius error of the "
          "reconstructed weight. Ratio = time / the baseline's time (first row of each group).", ""]
    for case in dict.fromkeys(r["case"] for r in dec):
        L += [f"**{case}**", "", "| method | implementation | rank | params | time (runs) | vs baseline | error |",
              "|---|---|---|---:|---:|---:|---:|"]
        rows = [r for r in dec if r["case"] == case]
        for g in dict.fromkeys(r["group"] for r in rows):
            grp = [r for r in rows if r["group"] == g]
            base = next(r for r in grp if r.get("baseline"))
            for r in grp:
                L.append(f"| {g} | {r['impl']} | {fmt_rank(r['rank'])} | {r['params']:,} | {fmt_s(r['time'])} "
                         f"({r['n']}) | {r['time'] / base['time']:.2f}x | {r['err']:.4f} |")
        L.append("")
    t256 = [r for r in dec if r["case"].startswith("conv 256") and r["group"] == "tucker2"]
    if t256:
        hooi = next(r for r in t256 if r.get("baseline"))
        mine = next(r for r in t256 if r.get("ts"))
        speed = hooi["time"] / mine["time"]
        within = mine["err"] <= hooi["err"] * 1.01
        L.append(f"Target: tucker2 at least 10x faster than tensorly's HOOI at (64, 64) on 256x256x3x3 with "
                 f"error within 1%: {speed:.1f}x faster ({yn(speed >= 10)}), error {mine['err']:.4f} vs "
                 f"{hooi['err']:.4f} ({(mine['err'] / hooi['err'] - 1) * 100:+.2f}%, {yn(within)}).")
        cp_rows = [r for r in dec if r["group"] == "cp"]
        if cp_rows:
            parts = []
            for case in dict.fromkeys(r["case"] for r in cp_rows):
                grp = [r for r in cp_rows if r["case"] == case]
                base = next(r for r in grp if r.get("baseline"))
                mine = next(r for r in grp if r.get("ts"))
                parts.append(f"{mine['time'] / base['time']:.1f}x tensorly's time on {case.split(' ')[1]}")
            L[-1] += (f" tensorscope's CP-ALS takes {', '.join(parts)} at the same iteration cap and nearly the "
                     "same error (it runs tensorly's `parafac` in float64).")
        L.append("")

    L += ["**A second rank of an already factorized layer**: first = the cold time of tensorscope's row above "
          "(rank A, cache cleared), second = rank B right after it, cache warm (median of the same number of "
          "runs). Target: the second at least 100x faster.", "",
          "| method | layer | rank A -> B | first (cold) | second | first / second | target |",
          "|---|---|---|---:|---:|---:|---|"]
    for s in second:
        label = s["method"] + ("" if s["refine"] else " (`refine=False`)")
        ratio = s["first"] / s["second"]
        L.append(f"| {label} | {s['layer']} | {fmt_rank(s['a'])} -> {fmt_rank(s['b'])} | {fmt_s(s['first'])} | "
                 f"{fmt_s(s['second'])} | {ratio:.0f}x | {yn(ratio >= 100)} |")
    L += ["", "What `compress` builds (`refine=True`) refits per rank by design: Tucker-2 reruns its HOOI "
          "sweep from the cached mode eigendecompositions, and CP-ALS and TT-SVD have no factorization that "
          "all ranks share, so their second rank costs as much as the first (the explorer memoises them per "
          "rank instead). What a slider move needs is the truncation: `svd`, and `tucker2` with "
          "`refine=False` (a slice of the cached full HOSVD core), where weight hashes and finiteness checks "
          "are memoised per tensor; on the small 256x256x3x3 kernel the fixed cost of a call (building the "
          "factor tensors) keeps the ratio below 100x because the first factorization itself is cheap.", ""]

    # -- 2
    L += ["### Inference latency: factorized versus dense", "",
          f"Conv 256x256x3x3 (padding 1, bias) on a 32x256x32x32 batch; Linear 4096x4096 on 128 rows; "
          "`torch.inference_mode`, NCHW unless marked. Every module of a table is timed once per round, "
          "round-robin; the latency ratio is the median over rounds of its time over the dense layer's time "
          "in the same round (layers over 10x slower than dense take part in fewer rounds: "
          f"{'3' if not meta['quick'] else '1'}, and are skipped at the second thread count). "
          "FLOP ratio from `FlopCounterMode` at the same batch (on the meta "
          "device), the same counter for all. tltorch layers use "
          "`implementation='factorized'` (its default `reconstructed` runs the dense conv on the rebuilt "
          "kernel); latency does not depend on the values, so the layers carry random factors.", ""]
    dp = lat["dense_params"]
    checks = []
    for kind in ("conv", "linear"):
        ths = sorted(lat[kind])
        head = "| fewer params | layer | params | FLOP ratio | " + " | ".join(
            f"latency ratio, {t} thr" for t in ths)
        cl = kind == "conv" and any(len(k) == 3 for k in lat[kind][ths[0]]["ratio"])
        if cl:
            head += " | " + " | ".join(f"channels_last, {t} thr (vs dense CL)" for t in ths)
        L += [f"**{'Conv 256x256x3x3' if kind == 'conv' else 'Linear 4096x4096'}**: dense "
              + ", ".join(f"{fmt_s(lat[kind][t]['time'][('dense',)])} at {t} thread(s)" for t in ths)
              + (", channels_last dense / NCHW dense: " + ", ".join(
                  f"{lat[kind][t]['ratio'][('dense', 'cl')]:.2f} ({t} thr)" for t in ths) if cl else "")
              + f"; {dp[kind]:,} params.", "", head + " |",
              "|" + "---|" * 2 + "---:|" * (2 + len(ths) * (2 if cl else 1))]
        for (s, name), md in lat["meta"][kind].items():
            cells = [f"{lat[kind][t]['ratio'][(s, name)]:.2f}" if (s, name) in lat[kind][t]["ratio"] else "skipped"
                     for t in ths]
            if cl:
                cells += [f"{lat[kind][t]['ratio'][(s, name, 'cl')] / lat[kind][t]['ratio'][('dense', 'cl')]:.2f}"
                          if (s, name, "cl") in lat[kind][t]["ratio"] else "" for t in ths]
            L.append(f"| {s}x | {name} | {md['params']:,} ({dp[kind] / md['params']:.1f}x) | "
                     f"{md['flop_ratio']:.3f} | " + " | ".join(cells) + " |")
        L.append("")
        # targets (at 1 thread, the first of ths, and at every thread count)
        for t in ths:
            ratio = lat[kind][t]["ratio"]
            for (s, name), md in lat["meta"][kind].items():
                if not name.startswith("tensorscope") or (s, name) not in ratio:
                    continue
                meth = name.split("`")[1]
                if kind == "linear":
                    short = name.replace("tensorscope ", "")
                    checks.append((t, f"Linear {short} at or below its FLOP ratio {md['flop_ratio']:.3f}",
                                   ratio[(s, name)] <= md["flop_ratio"], ratio[(s, name)]))
                if kind == "conv" and meth == "tucker2":
                    lim = 0.6 if s == 4 else 0.35
                    checks.append((t, f"Tucker-2 conv at {s}x fewer params at or below {lim}", ratio[(s, name)] <= lim,
                                   ratio[(s, name)]))
                twin = {"tucker2": "tltorch tucker", "cp": "tltorch cp", "tt": "tltorch blocktt",
                        "svd": None}[meth]
                tl_names = [n for (ss, n) in lat["meta"][kind] if ss == s and n.startswith("tltorch")]
                tl_names = [n for n in tl_names if (s, n) in ratio]
                if twin:  # the tltorch layer of the same structure
                    tw = next((n for n in tl_names if n.startswith(twin + " ")), None)
                else:  # svd has no tltorch twin: the fastest tltorch layer at that count
                    tw = min(tl_names, key=lambda n: ratio[(s, n)], default=None)
                if tw is None:
                    continue
                short = name.replace("tensorscope ", "")
                a, b = ratio[(s, name)], ratio[(s, tw)]
                checks.append((t, f"{kind} {short} not slower than {tw}", a <= b,
                               f"{a:.2f} vs {b:.2f}" + (" (within 10%: a tie)" if abs(a - b) <= 0.1 * b else "")))
    note = ""
    for kind in ("conv", "linear"):
        ths = sorted(lat[kind])
        if len(ths) > 1 and lat[kind][ths[-1]]["time"][("dense",)] > lat[kind][ths[0]]["time"][("dense",)]:
            note = (" The dense layers ran slower with more threads than with one (the cores are shared with "
                    "other work), so the multi-thread columns are noisier than the 1-thread ones.")
    L += ["Targets (latency ratios to dense in the same run; \"not slower than tltorch\" compares the tltorch "
          "layer of the same structure, or for `svd`, which has none, the fastest tltorch layer at that "
          "parameter count). tensorscope's Tucker-2 and tltorch's Tucker run the same three convolutions, so "
          "differences within ~10% between them flip from run to run and between thread counts: read those as "
          "ties." + note, "", "| threads | target | measured | |", "|---:|---|---|---|"]
    for t, what, ok, val in checks:
        v = f"{val:.2f}" if isinstance(val, float) else val
        L.append(f"| {t} | {what} | {v} | {yn(ok)} |")
    t1 = min(lat["conv"])
    slow = {kind: [n for (sh, n) in lat["meta"][kind] if lat[kind][t1]["ratio"][(sh, n)] > 1.0]
            for kind in ("conv", "linear")}
    txt = [f"Slower than dense at {t1} thread: conv: " + (", ".join(f"{n}" for n in slow["conv"]) or "none")
           + "; Linear: " + (", ".join(slow["linear"]) or "none") + "."]
    if any(" cp " in n or n.startswith("tltorch cp") or "`cp`" in n for n in slow["conv"]):
        txt.append("CP's two depthwise convs (kx1 then 1xk over R channels) do little arithmetic per byte and "
                   "run far below the GEMM rate of the 1x1 convs, so CP falls furthest behind its FLOP ratio.")
    if any("`tt`" in n for n in slow["linear"]):
        txt.append("tensorscope's TT-matrix layer sweeps the input through the cores one GEMM at a time; at "
                   "4x-10x compression the bonds are so large that the sweep costs more FLOPs than the dense "
                   "matmul (FLOP ratio above 1), while tltorch's einsum contracts the cores first when the "
                   "batch is large, which is why BlockTT is far faster at the same parameter count.")
    L += ["", " ".join(txt), ""]
    if comp is not None:
        if "skipped" in comp:
            L += [f"torch.compile: skipped ({comp['skipped']}).", ""]
        else:
            r = comp["ratio"]
            L += [f"torch.compile (child process, {meta['threads']} thread, inductor; compile "
                  f"{comp['compile_dense']:.0f} s for the dense conv, {comp['compile_tucker2']:.0f} s for Tucker-2 "
                  f"[57, 57]; the inductor cache in /tmp may make a rerun faster): latency ratio to eager dense: "
                  f"dense compiled {r['dense_compiled']:.2f}, Tucker-2 eager {r['tucker2']:.2f}, Tucker-2 compiled "
                  f"{r['tucker2_compiled']:.2f}.", ""]

    # -- 3
    L += ["### Accuracy at equal parameter budget (no fine-tuning)", "",
          "tltorch uniform = every Linear and Conv2d replaced by its tensorly-torch factorized layer "
          "(`from_linear`/`from_conv`, its own data-free decomposition) with one rank fraction for all layers, "
          "found by bisection so that the whole model keeps the target parameter count (`tucker`: Tucker conv, "
          "Tucker-tensorized Linear; `blocktt`: TT conv, BlockTT Linear with 3 modes). tensorscope = "
          "`plan_for_budget(model, keep)` + `compress` (data-free), and with `data=example.calibration()` (256 "
          "training images) for both. Test split: the example's 1000 held-out images. Cells: top-1 accuracy "
          "(fraction of parameters actually kept).", "",
          "| net (dense acc.) | keep | tltorch uniform tucker | tltorch uniform blocktt | tensorscope | "
          "tensorscope + data |", "|---|---:|---|---|---|---|"]

    def cell(v):
        return "n/a" if v is None else f"{v[0]:.1%} ({v[1]:.1%})"

    wins = []
    for r in qual:
        L.append(f"| {r['net']} ({r['dense']:.1%}) | {r['keep']:.0%} | {cell(r.get('tucker'))} | "
                 f"{cell(r.get('blocktt'))} | {cell(r['ts'])} | {cell(r['ts_data'])} |")
        tl_best = max((r[k][0] for k in ("tucker", "blocktt") if r.get(k)), default=float("nan"))
        wins.append((r["ts"][0] >= tl_best, r["ts_data"][0] >= tl_best))
        off = [r[k][1] for k in ("tucker", "blocktt") if r.get(k) and abs(r[k][1] - r["keep"]) > 0.02 * r["keep"]]
        if off:
            wins[-1] = wins[-1] + ("off",)
    n_ok = sum(a for a, *_ in wins)
    n_ok_d = sum(b for _, b, *_ in wins)
    drop_ts = max(r["dense"] - max(r["ts"][0], r["ts_data"][0]) for r in qual)
    drop_tl = [r["dense"] - max(r[k][0] for k in ("tucker", "blocktt") if r.get(k)) for r in qual
               if r.get("tucker") or r.get("blocktt")]
    L += ["", f"tensorscope is at least as accurate as the best tltorch uniform model in {n_ok}/{len(wins)} cells "
          f"without data and {n_ok_d}/{len(wins)} with data; the better of its two stays within "
          f"{drop_ts * 100:.1f} points of dense everywhere, while the best tltorch model loses "
          f"{min(drop_tl) * 100:.1f}-{max(drop_tl) * 100:.1f} points. One rank fraction for every layer ignores how "
          "much each layer can lose, and the planner, choosing per layer from the spectra, keeps what matters."
          + (" Some tltorch cells could not be sized within 2% of the target (its rank rounding); their kept "
             "fraction is shown." if any(len(w) == 3 for w in wins) else ""), ""]

    # -- 4
    extra = (mem["peak"] - mem["before"]) / mem["model_bytes"]
    L += ["### Peak memory of all spectra (11M ResNet-18-style net)", "",
          f"Fresh child process: model {mem['model_bytes'] / 2**20:.1f} MiB (parameters and buffers); resident "
          f"before the spectra {mem['before'] / 2**20:.0f} MiB (Python, torch and the model); peak during both "
          f"unfoldings' spectra {mem['peak'] / 2**20:.0f} MiB "
          f"({'high-water mark reset just before' if mem['reset'] else 'lifetime peak'}); afterwards "
          f"{mem['after'] / 2**20:.0f} MiB with the factor cache holding {mem['cache_bytes'] / 2**20:.0f} MiB "
          f"({mem['cache_bytes'] / mem['model_bytes']:.1f}x the model). Extra over the pre-spectra baseline: "
          f"{(mem['peak'] - mem['before']) / 2**20:.0f} MiB = {extra:.1f}x the model size (target under 3x: "
          f"{yn(extra < 3)}). The whole process peaks at {mem['peak'] / mem['model_bytes']:.1f}x the model size, "
          f"most of it the interpreter and torch. Spectra took {fmt_s(mem['seconds'])} there. (`ru_maxrss` is "
          f"no use for the baseline here: a child inherits its parent's peak through fork/exec, "
          f"{mem['max_before'] / 2**20:.0f} MiB before the spectra ran.)", ""]

    # -- 5
    L += ["### Scale: inspect plus all spectra as the network grows", "",
          "Random weights; cold factor cache. Work = sum over layers of m^2 n (m <= n) for both unfoldings, "
          "the order of an SVD or a Gram eigendecomposition; ns/work = total seconds / work, constant when the "
          "time follows the LAPACK cost. The chains have many small layers (Linear 128x128): time per layer "
          "should stay flat if nothing is quadratic in the layer count.", "",
          "| network | params | layers | inspect | spectra `out` | spectra `in` | total | per layer | "
          "work (1e9) | ns / work | factor cache |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in scale:
        tot = r["inspect"] + r["out"] + r["in"]
        L.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['layers']} | {fmt_s(r['inspect'])} | "
                 f"{fmt_s(r['out'])} | {fmt_s(r['in'])} | {fmt_s(tot)} | {fmt_s(tot / r['layers'])} | "
                 f"{r['work'] / 1e9:.1f} | {tot / r['work'] * 1e9:.2f} | {r['cache'] / 2**20:.0f} MiB |")
    res = [r for r in scale if r["name"].startswith("ResNet")]
    ch = [r for r in scale if r["name"].startswith("chain")]
    txt = []
    if len(res) >= 2:
        a, b = res[0], res[-1]
        ta = a["inspect"] + a["out"] + a["in"]
        tb = b["inspect"] + b["out"] + b["in"]
        p = math.log(tb / ta) / math.log(b["params"] / a["params"])
        nw = [(r["inspect"] + r["out"] + r["in"]) / r["work"] * 1e9 for r in res]
        txt.append(f"From {a['params'] / 1e6:.1f}M to {b['params'] / 1e6:.0f}M parameters the time grows "
                   f"{tb / ta:.0f}x (~params^{p:.2f}); widening by k multiplies the parameters by k^2 but the SVD "
                   f"work by k^3 (params^1.5), and the time per unit of work falls from {nw[0]:.2f} to "
                   f"{nw[-1]:.2f} ns (larger LAPACK calls run closer to peak), hence the smaller exponent. "
                   "The `out` spectra (the singular values, "
                   "`torch.linalg.svdvals`, of each out x in*kh*kw matrix) dominate; the `in` spectra use a Gram "
                   "eigendecomposition and are several times cheaper per unit of work.")
    if len(ch) >= 2:
        a, b = ch[0], ch[-1]
        pa = (a["inspect"] + a["out"] + a["in"]) / a["layers"]
        pb = (b["inspect"] + b["out"] + b["in"]) / b["layers"]
        txt.append(f"Per layer, the chain of {b['layers']} costs {pb / pa:.2f}x what the chain of {a['layers']} "
                   f"does ({'no' if pb / pa < 1.5 else 'a'} sign of a cost quadratic in the number of layers).")
    L += ["", " ".join(txt), ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads outside the latency tables (default 1)")
    ap.add_argument("--quick", action="store_true", help="smaller cases and fewer repeats (about 3 minutes)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--child", choices=("memory", "compile"), help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)  # pickle the measurements here (to re-render)
    ap.add_argument("--render-from", help=argparse.SUPPRESS)  # render a pickle instead of measuring
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "memory":
        _memory_child(args.threads)
        return
    if args.child == "compile":
        _compile_child(args.threads)
        return
    if args.render_from:
        import pickle

        with open(args.render_from, "rb") as f:
            text = render(*pickle.load(f))
        print(text)
        if not args.no_write:
            report.write_section(SECTION, text)
            print(f"wrote section '{SECTION}' of {DOC}")
        return
    q = args.quick
    t_start = time.perf_counter()
    sections: dict[str, float] = {}
    meta = {"machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU(s)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_start": report.load_average(), "quick": q}
    print(f"# {meta}", flush=True)
    warnings.filterwarnings("ignore", module="tensorly")
    warnings.filterwarnings("ignore", module="tltorch")

    # 1. decomposition
    print("1. decomposition", flush=True)
    cp_iters = 3 if q else 5  # on 256x256x3x3; 3 on 512x512x3x3 (CP-ALS there takes ~10 s per iteration)
    budget = 1.5 if q else 4.0
    cases = [("conv 256x256x3x3", (256, 256, 3, 3), 64)]
    if not q:
        cases.append(("conv 512x512x3x3", (512, 512, 3, 3), 128))
    lin_n = 1024 if q else 4096
    dec = []
    layers = {}
    for case, shape, r in cases:
        c = nn.Conv2d(shape[1], shape[0], shape[2], padding=1, bias=False)
        with torch.no_grad():
            c.weight.copy_(decaying(shape))
        layers[case] = c
        with quiet():
            dec += bench_decomposition(case, c, r, cp_iters if r == 64 else 3, budget, cp_second=(r == 64))
    lin = nn.Linear(lin_n, lin_n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(decaying((lin_n, lin_n)))
    lcase = f"Linear {lin_n}x{lin_n}"
    with quiet():
        dec += bench_decomposition(lcase, lin, 0, cp_iters, budget)
    second = list(SECOND)
    del layers, lin
    factor_cache.clear()
    gc.collect()
    sections["decomposition"] = time.perf_counter() - t_start

    # 2. latency
    print("2. latency", flush=True)
    threads_list = [1] if q else sorted({1, DEFAULT_THREADS})
    lat = bench_latency(threads_list, 5 if q else 9, channels_last=True, tt3=not q)
    comp = None if q else bench_compile(args.threads, 150)
    torch.set_num_threads(args.threads)
    sections["latency"] = time.perf_counter() - t_start - sum(sections.values())

    # 3. quality
    print("3. quality", flush=True)
    qual = bench_quality(["lenet5", "mlp"], [0.25] if q else [0.1, 0.25, 0.5])
    sections["quality"] = time.perf_counter() - t_start - sum(sections.values())

    # 4. memory
    print("4. memory", flush=True)
    mem = bench_memory(args.threads)
    print(f"  {mem}", flush=True)
    sections["memory"] = time.perf_counter() - t_start - sum(sections.values())

    # 5. scale
    print("5. scale", flush=True)
    scale = bench_scale([0.3125, 1.0] if q else [0.3125, 1.0, 3.0], [32, 128] if q else [32, 128, 512])

    sections["scale"] = time.perf_counter() - t_start - sum(sections.values())
    meta["load_end"] = report.load_average()
    meta["total"] = time.perf_counter() - t_start
    meta["sections"] = sections
    print(f"# section times: { {k: round(v) for k, v in sections.items()} }", flush=True)
    if args.dump:
        import pickle

        with open(args.dump, "wb") as f:
            pickle.dump((meta, dec, second, lat, comp, qual, mem, scale), f)
    text = render(meta, dec, second, lat, comp, qual, mem, scale)
    print()
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
