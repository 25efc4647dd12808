# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Convolutions: Tucker-2 and CP
#
# A conv kernel is a 4-way tensor $K \in \mathbb{R}^{O \times I \times k_h \times k_w}$.
# Chapter 1 flattened it into a matrix; here we keep its four modes and factor the tensor
# itself, which turns one convolution into a chain of cheaper ones.
#
# **You will learn to**
#
# 1. write the Tucker-2 (Kim et al. 2016) and CP (Lebedev et al. 2015) forms of a kernel and
#    draw them as chains of ordinary conv layers;
# 2. derive their parameter and FLOP counts and check them against the library and the
#    built modules;
# 3. pick Tucker-2 ranks with variational Bayesian matrix factorization (VBMF);
# 4. compare accuracy against compression for both methods on the built-in LeNet-5;
# 5. see why CP-ALS, the algorithm behind CP, can be slow and unstable.

# %%
import time
import warnings

import holoviews as hv
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import tensorly as tl
import torch
from matplotlib.patches import FancyArrow, FancyBboxPatch
from tensorly.decomposition import parafac
from tqdm.auto import tqdm

try:
    import tensorscope as ts
except ImportError:  # a source checkout without `pip install -e .`: use the parent folder
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path.cwd().parent))
    import tensorscope as ts
from tensorscope.examples import load_example

hv.extension("bokeh")
torch.manual_seed(0)
# The tensors here are small: one thread is as fast as two, and avoids the thread
# contention that slows small factorizations badly on a busy 2-core machine.
torch.set_num_threads(1)
T0 = time.perf_counter()

# %% [markdown]
# We work on LeNet-5's second convolution, `features.3`: 20 input channels, 50 output
# channels, 5 x 5 kernels, on 12 x 12 inputs.

# %%
ex = load_example("lenet5", progress=True)
model = ex.model
name = "features.3"
conv = model.get_submodule(name)
x_in = torch.randn(1, conv.in_channels, 12, 12)  # the layer's input size inside LeNet
geom = ts.LayerGeometry.of(conv, in_size=(12, 12))
O, I, kh, kw = conv.weight.shape
print(f"{name}: weight {tuple(conv.weight.shape)}, {geom.dense_params:,} parameters, "
      f"{geom.dense_flops:,} FLOPs per image, output {geom.out_size}; network accuracy {ex.accuracy:.1%}")

# %% [markdown]
# ## Tucker-2: squeeze the channels
#
# Tucker decomposes a tensor into a small core multiplied by a factor matrix along each
# mode. Tucker-2 factors only the two channel modes and leaves the small spatial modes
# alone:
#
# $$K[o, i, y, x] \approx \sum_{a=1}^{r_\text{out}} \sum_{b=1}^{r_\text{in}}
#   U_\text{out}[o, a]\; G[a, b, y, x]\; U_\text{in}[i, b].$$
#
# Read from the input side, this is three convolutions:
#
# 1. a 1 x 1 conv $I \to r_\text{in}$ with weights $U_\text{in}^\top$ (project the input channels);
# 2. a $k_h \times k_w$ conv $r_\text{in} \to r_\text{out}$ with the core $G$ (the layer's
#    stride and padding live here);
# 3. a 1 x 1 conv $r_\text{out} \to O$ with weights $U_\text{out}$ and the bias.
#
# The factors come from the HOSVD (the leading left singular vectors of the output- and
# input-mode unfoldings), refined by a few HOOI sweeps. In a plan the rank is
# `[r_out, r_in]`, in the order of the weight's own dimensions.

# %%
tucker_rank = [12, 8]
tucker_model = ts.compress(model, ts.Plan({name: {"method": "tucker2", "rank": tucker_rank}}))
tucker_chain = tucker_model.get_submodule(name)
tucker_chain


# %% [markdown]
# A static drawing shows the chain better than a repr: each box is one ordinary
# `nn.Conv2d`, with its parameter count.

# %%
def draw_chain(chain, title, ax):
    """Draw a FactorizedLayer as boxes (one per conv) joined by arrows."""
    mods = list(chain)
    ax.set_xlim(0, len(mods) * 3 + 1)
    ax.set_ylim(0, 3)
    ax.axis("off")
    ax.text(0.1, 1.5, f"{mods[0].in_channels} ch", va="center", fontsize=9)
    for j, m in enumerate(mods):
        x0 = 1 + 3 * j
        kind = "depthwise " if m.groups > 1 and m.groups == m.in_channels else ""
        label = (f"{kind}Conv {m.kernel_size[0]}x{m.kernel_size[1]}\n{m.in_channels} → {m.out_channels}\n"
                 f"{sum(p.numel() for p in m.parameters()):,} params")
        ax.add_patch(FancyBboxPatch((x0, 0.6), 2.2, 1.8, boxstyle="round,pad=0.05",
                                    fc="#dbe9f6" if m.kernel_size == (1, 1) else "#fbe3c9", ec="black"))
        ax.text(x0 + 1.1, 1.5, label, ha="center", va="center", fontsize=9)
        ax.add_patch(FancyArrow(x0 - 0.75, 1.5, 0.6, 0, width=0.04, head_width=0.2, head_length=0.12, color="gray"))
    ax.set_title(title, fontsize=11)


dense_label = f"dense: Conv {kh}x{kw}, {I} → {O}, {geom.dense_params:,} params"
fig, ax = plt.subplots(figsize=(9, 1.9))
draw_chain(tucker_chain, f"Tucker-2 at rank {tucker_rank} replacing the {dense_label}", ax)
plt.show()

# %% [markdown]
# The three conv weights *are* the factors: contracting them gives back the approximated
# kernel. (For 1 x 1 convs the weight is just a matrix.)

# %%
first, core, last = tucker_chain
U_in = first.weight.detach()[:, :, 0, 0].T  # (I, r_in)
G = core.weight.detach()  # (r_out, r_in, kh, kw)
U_out = last.weight.detach()[:, :, 0, 0]  # (O, r_out)
K_tucker = torch.einsum("oa,abyx,ib->oiyx", U_out, G, U_in)
with torch.no_grad():
    chain_out = tucker_chain(x_in)
    kernel_out = torch.nn.functional.conv2d(x_in, K_tucker, conv.bias)
torch.testing.assert_close(chain_out, kernel_out, rtol=1e-4, atol=1e-5)
tucker_err = float((K_tucker - conv.weight.detach()).norm() / conv.weight.detach().norm())
print(f"the chain computes the conv with the contracted kernel; kernel relative error {tucker_err:.3f}")

# %% [markdown]
# ## CP: a sum of rank-one kernels
#
# The canonical polyadic (CP) decomposition writes the kernel as a sum of $R$ outer
# products of vectors, one per mode:
#
# $$K[o, i, y, x] \approx \sum_{r=1}^{R} A_\text{out}[o, r]\, A_\text{in}[i, r]\,
#   A_h[y, r]\, A_w[x, r].$$
#
# As a chain (Lebedev et al. 2015): a 1 x 1 conv $I \to R$ ($A_\text{in}^\top$), a
# *depthwise* $k_h \times 1$ conv (each of the $R$ channels filtered by its own column of
# $A_h$), a depthwise $1 \times k_w$ conv ($A_w$), and a 1 x 1 conv $R \to O$
# ($A_\text{out}$, with the bias). The spatial filter is separable in each component.

# %%
cp_rank = 24
cp_model = ts.compress(model, ts.Plan({name: {"method": "cp", "rank": cp_rank}}))
cp_chain = cp_model.get_submodule(name)
fig, ax = plt.subplots(figsize=(11, 1.9))
draw_chain(cp_chain, f"CP at rank {cp_rank} replacing the {dense_label}", ax)
plt.show()

# %%
a_in = cp_chain[0].weight.detach()[:, :, 0, 0].T  # (I, R)
a_h = cp_chain[1].weight.detach()[:, 0, :, 0].T  # (kh, R)
a_w = cp_chain[2].weight.detach()[:, 0, 0, :].T  # (kw, R)
a_out = cp_chain[3].weight.detach()[:, :, 0, 0]  # (O, R)
K_cp = torch.einsum("or,ir,yr,xr->oiyx", a_out, a_in, a_h, a_w)
with torch.no_grad():
    torch.testing.assert_close(cp_chain(x_in), torch.nn.functional.conv2d(x_in, K_cp, conv.bias),
                               rtol=1e-4, atol=1e-5)
cp_err = float((K_cp - conv.weight.detach()).norm() / conv.weight.detach().norm())
print(f"CP chain = conv with the sum of {cp_rank} rank-one kernels; kernel relative error {cp_err:.3f}")

# %% [markdown]
# At full rank both forms are exact. For Tucker-2 that is $[O, I]$; for CP the library
# uses the trivial bound on a 4-way tensor's rank, the product of its three smallest
# dimensions (here $20 \cdot 5 \cdot 5 = 500$), where the factors can be written down
# without any iteration.

# %%
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore", ts.BreakEvenWarning)  # full rank is larger than dense, on purpose
    y_dense = conv(x_in)
    for method in ("tucker2", "cp"):
        full = ts.get_method(method).max_rank(geom)
        exact = ts.compress(model, ts.Plan({name: {"method": method, "rank": full}})).get_submodule(name)
        torch.testing.assert_close(exact(x_in), y_dense, rtol=1e-4, atol=1e-4)
        print(f"{method} at full rank {full}: output equals the dense conv's")

# %% [markdown]
# ## Counting parameters and FLOPs
#
# With input $H \times W$, output $H' \times W'$ and one multiply-add counted as 2 FLOPs
# (as `torch.utils.flop_counter.FlopCounterMode` counts):
#
# | | parameters | FLOPs per image |
# |---|---|---|
# | dense | $O I k_h k_w + O$ | $2\,H'W' \, O I k_h k_w$ |
# | Tucker-2 | $I r_\text{in} + r_\text{out} r_\text{in} k_h k_w + O r_\text{out} + O$ | $2\,(HW\, I r_\text{in} + H'W'\, r_\text{out} r_\text{in} k_h k_w + H'W'\, O r_\text{out})$ |
# | CP | $R\,(I + k_h + k_w + O) + O$ | $2\,(HW\, I R + H'W\, R k_h + H'W'\, R k_w + H'W'\, O R)$ |
#
# The CP FLOPs have $H'W$ in the vertical term: the $k_h \times 1$ conv shrinks only the
# height. Three sources must agree: these formulas, the library's counters (which the
# planner uses to price ranks without building anything), and the built modules, counted
# by torch itself.

# %%
H, W_ = 12, 12
Ho, Wo = geom.out_size


def formula(method, rank):
    if method == "tucker2":
        ro, ri = rank
        return (I * ri + ro * ri * kh * kw + O * ro + O,
                2 * (H * W_ * I * ri + Ho * Wo * ro * ri * kh * kw + Ho * Wo * O * ro))
    R = rank
    return R * (I + kh + kw + O) + O, 2 * (H * W_ * I * R + Ho * W_ * R * kh + Ho * Wo * R * kw + Ho * Wo * O * R)


rows = []
for method, rank in [("tucker2", (12, 8)), ("tucker2", (5, 5)), ("tucker2", (50, 20)), ("cp", 24), ("cp", 8)]:
    m = ts.get_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        entry = {"method": method, "rank": list(rank) if isinstance(rank, tuple) else rank}
        built = ts.compress(model, ts.Plan({name: entry})).get_submodule(name)
    p_formula, f_formula = formula(method, rank)
    p_lib, f_lib = m.count_params(geom, rank), m.count_flops(geom, rank)
    p_built, f_built = sum(p.numel() for p in built.parameters()), ts.count_flops(built, x_in)
    assert p_formula == p_lib == p_built and f_formula == f_lib == f_built, (method, rank)
    rows.append({"method": method, "rank": rank, "params": p_built, "FLOPs": f_built,
                 "param ratio": geom.dense_params / p_built, "FLOP ratio": geom.dense_flops / f_built})
pd.DataFrame(rows).round(2)

# %% [markdown]
# Formula, library and built module agree for every rank. Note the last Tucker-2 row: at
# full rank the chain has *more* parameters than the dense layer, and the library warns
# (`BreakEvenWarning`) when asked for such a rank.
#
# ## Choosing Tucker-2 ranks with VBMF
#
# Kim et al. (2016) choose $r_\text{out}$ and $r_\text{in}$ with the analytic empirical
# variational Bayesian matrix factorization of Nakajima et al. (2013). It models an
# unfolding as $M = B A^\top + E$ with Gaussian priors on the factors and Gaussian noise
# of variance $\sigma^2$, and finds, in closed form, the noise variance and the rank at
# which the posterior switches components off: singular values below a threshold
# $\approx \sqrt{M \sigma^2 (1 + \tau)(1 + \alpha/\tau)}$ (with $\alpha = L/M$ the aspect
# ratio) are treated as noise.
#
# First a check where the truth is known: a rank-10 matrix plus noise.

# %%
gen = torch.Generator().manual_seed(0)
L_, M_, true_rank, sigma = 64, 576, 10, 0.1
signal = torch.randn(L_, true_rank, generator=gen, dtype=torch.float64) @ torch.randn(
    true_rank, M_, generator=gen, dtype=torch.float64) / np.sqrt(true_rank)
noisy = signal + sigma * torch.randn(L_, M_, generator=gen, dtype=torch.float64)
res = ts.evbmf(torch.linalg.svdvals(noisy).numpy(), (L_, M_))
print(f"EVBMF: rank {res.rank} (true {true_rank}), noise variance {res.sigma2:.4f} (true {sigma ** 2:.4f})")
assert res.rank == true_rank and abs(res.sigma2 - sigma ** 2) < 0.1 * sigma ** 2

# %% [markdown]
# Now the two unfoldings of the trained kernel: the output mode ($O \times I k_h k_w$,
# `unfolding="out"`) and the input mode ($I \times O k_h k_w$, `unfolding="in"`).

# %%
vb = {}
plots = []
for unf in ("out", "in"):
    sp = ts.spectrum(model, name, unfolding=unf)
    fit = ts.evbmf(sp.values, sp.shape)
    vb[unf] = ts.vbmf_rank(sp)
    assert vb[unf] == fit.rank == int((sp.values > fit.threshold).sum())
    idx = np.arange(1, len(sp.values) + 1)
    plots.append((hv.Scatter((idx, sp.values), "index", "singular value").opts(size=5, tools=["hover"])
                  * hv.HLine(fit.threshold).opts(color="red", line_dash="dashed")).opts(
        title=f"{unf} unfolding {sp.shape}: VBMF rank {fit.rank}", width=380, height=280))
hv.Layout(plots).opts(shared_axes=False)

# %% [markdown]
# VBMF is aggressive on this small layer: it keeps only the few values that stand out
# of the noise floor (the titles give the ranks). MUSCO (Gusak et
# al. 2019) *weakens* the VBMF rank, $r_w = \max(r - w\,(r - r_\text{VBMF}),\ r_\min)$ with
# $w = 0.8$, and compresses in several gentler stages. Compare both with the dense layer:

# %%
vbmf_rank = [vb["out"], vb["in"]]
weak_rank = [ts.weakened_rank(O, vb["out"]), ts.weakened_rank(I, vb["in"])]
rows = [{"ranks": "dense", "rank": None, "params": geom.dense_params, "accuracy": ex.accuracy}]
for label, rank in (("VBMF", vbmf_rank), ("weakened VBMF (w = 0.8)", weak_rank)):
    small = ts.compress(model, ts.Plan({name: {"method": "tucker2", "rank": rank}}))
    rows.append({"ranks": label, "rank": rank, "params": sum(p.numel() for p in small.get_submodule(name).parameters()),
                 "accuracy": ts.evaluate(small, ex.test_loader())["accuracy"]})
vbmf_table = pd.DataFrame(rows)
vbmf_table

# %%
assert vbmf_table.accuracy.iloc[2] >= vbmf_table.accuracy.iloc[1] - 0.005  # weaker compression, no worse
assert vbmf_table.params.iloc[1] < vbmf_table.params.iloc[2] < geom.dense_params

# %% [markdown]
# ## Accuracy against compression
#
# Now sweep the ranks of both methods and measure the whole network on the 1000 test
# digits (no fine-tuning). Tucker-2 ranks keep the same fraction of both modes.

# %%
fractions = [0.1, 0.16, 0.24, 0.32, 0.48, 0.64]
cp_ranks = [4, 8, 16, 24, 32, 48, 64]
jobs = ([("tucker2", [max(1, round(f * O)), max(1, round(f * I))]) for f in fractions]
        + [("cp", r) for r in cp_ranks])
results = []
for method, rank in tqdm(jobs, desc="compress and evaluate"):
    t = time.perf_counter()
    small = ts.compress(model, ts.Plan({name: {"method": method, "rank": rank}}))
    seconds = time.perf_counter() - t
    chain = small.get_submodule(name)
    params = sum(p.numel() for p in chain.parameters())
    results.append({"method": method, "rank": str(rank), "params": params,
                    "compression": geom.dense_params / params,
                    "accuracy": ts.evaluate(small, ex.test_loader())["accuracy"],
                    "factorize s": seconds})
results = pd.DataFrame(results)
results.round(3)

# %%
curves = [hv.Curve(results[results.method == m], "compression", ["accuracy", "rank", "params"], label=m).opts(
    tools=["hover"]) * hv.Scatter(results[results.method == m], "compression", "accuracy").opts(size=6)
    for m in ("tucker2", "cp")]
(hv.Overlay(curves) * hv.HLine(ex.accuracy).opts(color="gray", line_dash="dashed")).opts(
    logx=True, width=620, height=340, legend_position="bottom_left",
    title=f"LeNet-5, {name} compressed (dashed: dense accuracy)")

# %% [markdown]
# At equal parameters, CP is the more compact form here: a CP component costs
# $I + k_h + k_w + O$ parameters, while Tucker-2 pays $r_\text{out} r_\text{in} k_h k_w$
# for its dense core. Both keep the network's accuracy at several-fold compression of
# the layer without any fine-tuning. The price of CP is time: look at the `factorize s`
# column, where each CP rank runs ALS while Tucker-2 truncates a cached HOSVD.

# %%
tk, cpr = results[results.method == "tucker2"], results[results.method == "cp"]
assert tk.accuracy.max() >= ex.accuracy - 0.01 and cpr.accuracy.max() >= ex.accuracy - 0.01
assert (tk.params.diff().dropna() > 0).all() and (cpr.params.diff().dropna() > 0).all()
assert cpr.accuracy.iloc[0] < cpr.accuracy.iloc[-1]  # rank 4 loses accuracy, rank 64 keeps it

# %% [markdown]
# The weight error tells the same story over all ranks at once. `ts.tradeoff` gives the
# whole Tucker-2 Pareto front (every rank pair, from one cached HOSVD) and the `svd` curve
# of chapter 1; CP has no such shortcut, each rank needs its own ALS run.

# %%
fronts = {m: ts.tradeoff(conv, m, name, geom) for m in ("svd", "tucker2")}
cp_err = []
for r in tqdm(cp_ranks, desc="CP-ALS"):
    chain = ts.compress(model, ts.Plan({name: {"method": "cp", "rank": r}})).get_submodule(name)
    A = [chain[0].weight[:, :, 0, 0].T, chain[1].weight[:, 0, :, 0].T, chain[2].weight[:, 0, 0, :].T,
         chain[3].weight[:, :, 0, 0]]
    K_r = torch.einsum("ir,yr,xr,or->oiyx", *[a.detach() for a in A])
    cp_err.append(float((K_r - conv.weight.detach()).norm() / conv.weight.detach().norm()))
cp_params = [ts.get_method("cp").count_params(geom, r) for r in cp_ranks]
(hv.Curve((fronts["svd"].params, fronts["svd"].errors), "parameters", "relative weight error", label="svd")
 * hv.Curve((fronts["tucker2"].params, fronts["tucker2"].errors), label="tucker2 (Pareto front)")
 * hv.Scatter((cp_params, cp_err), label="cp").opts(size=7)
 * hv.VLine(geom.dense_params).opts(color="gray", line_dash="dashed")).opts(
    logx=True, width=620, height=340, legend_position="bottom_left", title=f"{name}: weight error against size")

# %% [markdown]
# ## Why CP-ALS can be unstable
#
# Tucker-2 and SVD have closed-form optimal (or near-optimal) truncations; CP does not.
# The best rank-$R$ CP approximation is NP-hard to compute and, worse, **may not exist**.
# CP-ALS (alternating least squares) fixes three factors, solves a linear least-squares
# problem for the fourth, and cycles. Three things go wrong:
#
# 1. **Degeneracy.** The set of tensors of rank $\le R$ is not closed. The classic example
#    (de Silva and Lim 2008) is
#    $T = a \otimes a \otimes b + a \otimes b \otimes a + b \otimes a \otimes a$, which has
#    rank 3 but is the limit of rank-2 tensors
#    $n\,(a + \tfrac1n b)^{\otimes 3} - n\, a^{\otimes 3}$. Asked for rank 2, ALS chases that
#    limit: the error creeps towards 0 while two components grow without bound and cancel.
# 2. **Slow convergence** ("swamps"): long stretches where the error barely moves.
# 3. **Local optima** that depend on the initialization.
#
# The degenerate case, with tensorly's `parafac` (the solver the library uses):

# %%
rng = np.random.default_rng(0)
a, b = np.linalg.qr(rng.standard_normal((4, 2)))[0].T
T = (np.einsum("i,j,k->ijk", a, a, b) + np.einsum("i,j,k->ijk", a, b, a)
     + np.einsum("i,j,k->ijk", b, a, a))
degenerate = []
for iters in tqdm([10, 30, 100, 300, 1000], desc="CP-ALS, rank 2"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, factors = parafac(tl.tensor(T), 2, n_iter_max=iters, init="random", random_state=1, tol=0,
                                   normalize_factors=True)
    err = np.linalg.norm(T - tl.cp_to_tensor((weights, factors))) / np.linalg.norm(T)
    degenerate.append({"iterations": iters, "relative error": err, "largest component norm": np.abs(weights).max(),
                       "‖T‖": np.linalg.norm(T)})
degenerate = pd.DataFrame(degenerate)
degenerate

# %%
assert degenerate["relative error"].is_monotonic_decreasing
assert degenerate["largest component norm"].is_monotonic_increasing
assert degenerate["largest component norm"].iloc[-1] > 2.5 * np.linalg.norm(T)
iteration_ticks = list(degenerate.iterations)
(hv.Curve(degenerate, "iterations", "relative error").opts(logy=True, title="error creeps down")
 + hv.Curve(degenerate, "iterations", "largest component norm").opts(color="red", title="while components blow up")
 ).opts(hv.opts.Curve(width=330, height=260, logx=True, xticks=iteration_ticks))

# %% [markdown]
# The same signature appears on the trained kernel. Run the library's CP at rank 24 for
# more and more ALS iterations (the plan option `iters`) and compare the error with the
# *cancellation ratio* $\sum_r \prod_k \lVert a^{(k)}_r \rVert / \lVert K \rVert$, which is
# 1 when components do not overlap and grows when large components cancel each other.

# %%
cp = ts.get_method("cp")
rows = []
for iters in tqdm([1, 5, 25, 100, 300], desc="CP-ALS on features.3"):
    f = cp.factorize(conv, 24, {"iters": iters})
    K_r = cp.reconstruct(conv, f).detach()
    norms = torch.stack([f.tensors[k][0].norm(dim=0) for k in ("a_out", "a_in", "a_h", "a_w")]).prod(dim=0)
    Wt = conv.weight.detach()
    rows.append({"iterations": iters, "relative error": float((K_r - Wt).norm() / Wt.norm()),
                 "cancellation ratio": float(norms.sum() / Wt.norm())})
als = pd.DataFrame(rows)
als.round(4)

# %%
assert als["cancellation ratio"].iloc[-1] > 3 * als["cancellation ratio"].iloc[0]
assert als["relative error"].iloc[-1] > 0.9 * als["relative error"].iloc[2]  # 12x more work, < 10% better
(hv.Curve(als, "relative error", "cancellation ratio").opts(color="lightgray")
 * hv.Scatter(als, "relative error", ["cancellation ratio", "iterations"]).opts(size=9, tools=["hover"])
 * hv.Labels(als.assign(label=[f"{i} it." for i in als.iterations]), ["relative error", "cancellation ratio"],
             "label").opts(yoffset=0.08, text_font_size="9pt")).opts(
    logy=True, width=520, height=300, title="CP-ALS on features.3: error against cancellation")

# %% [markdown]
# More iterations buy a little weight error at the price of components that cancel
# each other, which makes the factors sensitive to rounding and to fine-tuning steps
# (Lebedev et al. report the same and fine-tune with a small learning rate). The
# library's mitigations: SVD initialization (deterministic), normalized and balanced
# factors, a bounded number of iterations, exact factors at full rank, and an error when
# ALS produces non-finite factors. Tucker-2 has none of these problems, which is why
# Kim et al. and MUSCO use it.
#
# ## Summary
#
# * Tucker-2 = 1 x 1, $k \times k$ core, 1 x 1; CP = 1 x 1, depthwise $k \times 1$,
#   depthwise $1 \times k$, 1 x 1. The chain's weights are the factors.
# * Parameter and FLOP formulas, the library's counters and torch's FLOP counter agree.
# * VBMF picks ranks from the spectrum's noise floor; it can be aggressive, and MUSCO's
#   weakening tempers it.
# * CP is more compact per parameter but needs iterative, possibly degenerate ALS;
#   Tucker-2 is closed-form and stable.
#
# **References.** Kim et al., *Compression of deep convolutional neural networks for fast
# and low power mobile applications*, ICLR 2016. Lebedev et al., *Speeding-up
# convolutional neural networks using fine-tuned CP-decomposition*, ICLR 2015. Nakajima
# et al., *Global analytic solution of fully-observed variational Bayesian matrix
# factorization*, JMLR 2013. Gusak et al., *Automated multi-stage compression of neural
# networks* (MUSCO), ICCVW 2019. de Silva and Lim, *Tensor rank and the ill-posedness of
# the best low-rank approximation problem*, SIMAX 2008. Kolda and Bader, *Tensor
# decompositions and applications*, SIAM Review 2009.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
