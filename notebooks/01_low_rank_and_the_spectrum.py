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
# # 1. Low rank and the spectrum
#
# A trained layer is a matrix, and a matrix is a sum of rank-one pieces of decreasing
# importance. This chapter looks at those pieces in a trained network and asks how many of
# them a layer really needs.
#
# **You will learn to**
#
# 1. read the singular value decomposition (SVD) of a trained layer and truncate it;
# 2. state the Eckart-Young theorem and check it on a real layer: the truncation error *is*
#    the tail of the spectrum;
# 3. summarise a spectrum by its retained energy, effective rank and stable rank, and see
#    what training does to them;
# 4. view a convolution as a linear operator and compute its spectrum from the Fourier
#    transform of its kernel (Sedghi et al. 2019);
# 5. drive a slider that truncates a layer of the built-in LeNet-5 and shows the error,
#    the parameters and the accuracy that follow.
#
# Everything is computed by `tensorscope`; the notebook only arranges and checks it.

# %%
import time
import warnings

import holoviews as hv
import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

try:
    import tensorscope as ts
except ImportError:  # a source checkout without `pip install -e .`: use the parent folder
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path.cwd().parent))
    import tensorscope as ts
from tensorscope.examples import build_example, load_example

hv.extension("bokeh")
torch.manual_seed(0)
torch.set_num_threads(1)
T0 = time.perf_counter()

# %% [markdown]
# ## The network
#
# `load_example("lenet5")` returns LeNet-5 trained on 4000 MNIST digits (it trains in a
# minute on first use and is cached afterwards). `ts.inspect` lists the layers a
# decomposition can act on, with their parameters and FLOPs per image (a multiply-add counts
# as 2 FLOPs).

# %%
ex = load_example("lenet5", progress=True)
model = ex.model
print(f"test accuracy {ex.accuracy:.1%} on {len(ex.test)} digits, {ts.count_params(model):,} parameters")
layers = ts.inspect(model, ex.example_input())
pd.DataFrame([{"layer": l.name, "kind": l.kind, "weight": l.weight_shape, "params": l.params,
               "FLOPs": l.flops, "max svd rank": l.max_rank["svd"]} for l in layers])

# %% [markdown]
# `classifier.1` (800 inputs, 500 outputs) holds 93% of the parameters: it is the layer
# to understand first.
#
# ## The SVD of a trained layer
#
# Any real $m \times n$ matrix factors as
#
# $$W = U \Sigma V^\top = \sum_{i=1}^{k} \sigma_i\, u_i v_i^\top, \qquad
#   \sigma_1 \ge \sigma_2 \ge \dots \ge \sigma_k \ge 0,\quad k = \min(m, n),$$
#
# with orthonormal columns $u_i$ and $v_i$. Keeping the first $r$ terms gives
# $W_r = U_r \Sigma_r V_r^\top$, which a network computes as two thin layers:
# $x \mapsto V_r^\top x$ ($n \to r$) then $z \mapsto U_r \Sigma_r z$ ($r \to m$), with
# $r(m + n)$ weights instead of $mn$.
#
# `ts.spectrum(model, name)` returns the singular values (computed once and cached) and
# everything derived from them.

# %%
name = "classifier.1"
spec = ts.spectrum(model, name)
s = spec.values
print(f"{name}: {spec.shape[0]} x {spec.shape[1]} matrix, {len(s)} singular values, "
      f"largest {s[0]:.3f}, smallest {s[-1]:.4f}")

# %%
hv.Curve((np.arange(1, len(s) + 1), s), "index i", "singular value σ_i").opts(
    logy=True, width=600, height=300, tools=["hover"], title=f"Spectrum of {name}")

# %% [markdown]
# ## Eckart-Young: the error of a truncation is the tail of the spectrum
#
# **Theorem** (Eckart and Young 1936). Among all matrices of rank at most $r$, the
# truncated SVD $W_r$ is closest to $W$ in Frobenius norm, and
#
# $$\min_{\operatorname{rank} B \le r} \lVert W - B \rVert_F = \lVert W - W_r \rVert_F
#   = \Big(\sum_{i > r} \sigma_i^2\Big)^{1/2}.$$
#
# So the relative error of the best rank-$r$ layer can be read off the spectrum without
# building anything: `spec.relative_error(r)`. Let us build the compressed layer with
# `ts.compress` and measure its error directly.

# %%
r = 32
small = ts.compress(model, ts.Plan({name: {"method": "svd", "rank": r}}))
chain = small.get_submodule(name)
print(chain)
first, second = chain[0], chain[1]
W = model.get_submodule(name).weight.detach().double()
W_r = second.weight.detach().double() @ first.weight.detach().double()
measured = float(torch.linalg.norm(W - W_r) / torch.linalg.norm(W))
print(f"rank {r}: measured relative error {measured:.6f}, Eckart-Young tail {spec.relative_error(r):.6f}")
assert abs(measured - spec.relative_error(r)) < 1e-5, "the svd error must equal the spectrum's tail"
assert torch.linalg.matrix_rank(W_r).item() == r

# %% [markdown]
# The optimality half of the theorem says no other rank-$r$ matrix does better. A quick
# sanity check: project $W$ onto random $r$-dimensional subspaces (the best rank-$r$
# approximation *within* a subspace is the projection $W Q Q^\top$).

# %%
gen = torch.Generator().manual_seed(0)
random_errors = []
for _ in range(20):
    Q, _ = torch.linalg.qr(torch.randn(W.shape[1], r, generator=gen, dtype=torch.float64))
    random_errors.append(float(torch.linalg.norm(W - W @ Q @ Q.T) / torch.linalg.norm(W)))
print(f"random rank-{r} projections: error {min(random_errors):.4f} at best; SVD: {spec.relative_error(r):.4f}")
assert min(random_errors) > spec.relative_error(r)

# %% [markdown]
# The parameter count the library predicts from the rank alone
# (`get_method("svd").count_params`, what the planner and the explorer use) is the count of
# the module it builds. The pair is smaller than the dense layer only while
# $r(m + n) < mn$, i.e. below the *break-even rank* $mn / (m + n)$; past it the library
# warns (`BreakEvenWarning`), and we silence that here on purpose.

# %%
geom = ts.LayerGeometry.of(model.get_submodule(name))
svd = ts.get_method("svd")
m_out, n_in = geom.out_features, geom.in_features
for r_check in (1, 8, 32, 200, spec.max_rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = ts.compress(model, ts.Plan({name: {"method": "svd", "rank": r_check}})).get_submodule(name)
    assert svd.count_params(geom, r_check) == sum(p.numel() for p in built.parameters())
    assert svd.count_params(geom, r_check) == r_check * (n_in + m_out) + m_out
print(f"predicted parameters = built parameters = r(m + n) + bias, for every rank checked; "
      f"break-even rank {m_out * n_in / (m_out + n_in):.0f} of {spec.max_rank}")

ranks = np.arange(1, spec.max_rank + 1)
rel_err = np.array([spec.relative_error(int(k)) for k in ranks])
(hv.Curve((ranks, rel_err), "rank r", "relative error ‖W − W_r‖/‖W‖").opts(tools=["hover"])
 * hv.Scatter([(r, measured)], label=f"measured at r = {r}").opts(size=10, color="red")).opts(
    width=600, height=300, title="Eckart-Young tail (line) and a built layer (dot)", legend_position="top_right")

# %% [markdown]
# The curve falls slowly: a trained layer of a small network is far from exactly low
# rank. Whether that matters is a question about *accuracy*, not weight error; we return
# to it with the slider at the end.
#
# ## Energy, effective rank, stable rank
#
# Three numbers summarise a spectrum.
#
# * **Retained energy** at rank $r$: $E(r) = \sum_{i \le r} \sigma_i^2 / \sum_i \sigma_i^2
#   = 1 - \text{relative error}^2$. The *energy rank* is the smallest $r$ with
#   $E(r) \ge$ a chosen fraction (`ts.energy_rank(spec, 0.9)`).
# * **Effective rank** (Roy and Vetterli 2007): with $p_i = \sigma_i / \sum_j \sigma_j$,
#   $\operatorname{erank} = \exp\big(-\sum_i p_i \log p_i\big)$, the exponential of the
#   entropy of the normalised spectrum. It equals $k$ for a flat spectrum and 1 for a
#   rank-one matrix.
# * **Stable rank**: $\lVert W \rVert_F^2 / \lVert W \rVert_2^2 = \sum_i \sigma_i^2 /
#   \sigma_1^2 \le \operatorname{rank} W$. Unlike the rank it does not move under small
#   perturbations, and it is small when one direction dominates.

# %%
print(f"energy at r = {r}: {spec.retained_energy(r):.4f} = 1 - error² = {1 - spec.relative_error(r) ** 2:.4f}")
p = s / s.sum()
assert np.isclose(spec.effective_rank, np.exp(-(p * np.log(p)).sum()))
assert np.isclose(spec.stable_rank, (s ** 2).sum() / s[0] ** 2)
assert np.isclose(spec.retained_energy(r), 1 - spec.relative_error(r) ** 2)
for keep in (0.5, 0.9, 0.99):
    k = ts.energy_rank(spec, keep)
    assert spec.energy[k - 1] >= keep and (k == 1 or spec.energy[k - 2] < keep)
    print(f"energy rank at {keep:.0%}: {k} of {spec.max_rank}")

# %%
energy_curves = [hv.Curve((np.arange(1, sp.max_rank + 1) / sp.max_rank, sp.energy), "rank / max rank",
                          "retained energy", label=n)
                 for n, sp in ts.spectra(model).items()]
hv.Overlay(energy_curves + [hv.HLine(0.9).opts(color="gray", line_dash="dashed")]).opts(
    width=600, height=320, legend_position="bottom_right", title="Retained energy of every layer")

# %% [markdown]
# ### What training does to a spectrum
#
# `build_example("lenet5")` gives the same network with its *initial* weights. A random
# matrix has a flat, "bulk" spectrum (Marchenko-Pastur). Training pulls out a few large
# singular values that carry what the layer learned, so the stable rank drops sharply
# while the effective rank, which weighs the bulk too, barely moves.

# %%
init = build_example("lenet5")
rows = []
for n in [l.name for l in layers]:
    for label, net in (("trained", model), ("init", init)):
        rows.append({"layer": n, "weights": label, **ts.spectrum(net, n).metrics()})
metrics = pd.DataFrame(rows).set_index(["layer", "weights"])
metrics.round(2)

# %%
for n in ("features.3", "classifier.1"):
    assert metrics.loc[(n, "trained"), "stable_rank"] < 0.6 * metrics.loc[(n, "init"), "stable_rank"]
s_init = ts.spectrum(init, name).values
outliers = int((s > s_init[0]).sum())
print(f"{name}: {outliers} singular values stand above the largest initial one ({s_init[0]:.2f}); "
      f"the median moved from {np.median(s_init):.3f} to {np.median(s):.3f}")
assert outliers < 0.1 * len(s)
(hv.Curve((np.arange(1, len(s) + 1), s), "index i", "σ_i", label="trained")
 * hv.Curve((np.arange(1, len(s_init) + 1), s_init), label="initial")).opts(
    logy=True, width=600, height=300, legend_position="top_right", title=f"{name}: trained against initial")

# %% [markdown]
# The picture explains chapter 1's main puzzle in advance: a few epochs of training add a
# handful of large singular values on top of a bulk that is still, to the eye, the random
# initialization. The outliers carry what was learned; the bulk carries most of the
# Frobenius norm. A truncation that keeps the outliers keeps the function while its
# *weight* error stays large.
#
# The `alpha` column is the exponent of a power law fitted to the tail of the eigenvalue
# density of $W^\top W$ (Martin and Mahoney 2021): smaller means heavier-tailed, i.e. more
# structure learned. It is `NaN` when a layer has too few singular values to fit.
#
# ## The spectrum of a convolution
#
# `svd` treats a conv kernel $K \in \mathbb{R}^{O \times I \times k \times k}$ as an
# $O \times Ik^2$ matrix. But the convolution itself is a linear map on whole images, from
# $\mathbb{R}^{I \times n \times n}$ to $\mathbb{R}^{O \times n \times n}$, a matrix of
# size $On^2 \times In^2$. With periodic (circular) boundaries it is block-circulant, so the
# 2-D discrete Fourier transform block-diagonalises it (Sedghi, Gupta and Long 2019): for
# each of the $n^2$ frequencies $(u, v)$,
#
# $$\hat K(u, v) = \sum_{a, b} K[:, :, a, b]\, e^{-2\pi i (ua + vb)/n} \in \mathbb{C}^{O \times I},$$
#
# and the singular values of the operator are those of all $n^2$ small matrices
# $\hat K(u, v)$ together. `ts.operator_spectrum(conv, n)` computes them.
#
# Check it on LeNet's second conv (50 x 20 x 5 x 5) by building the operator's matrix
# explicitly on 8 x 8 inputs: apply a circular conv to every basis image.

# %%
conv = model.features[3]
n = 8
op = ts.operator_spectrum(conv, n)
circular = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=2,
                           padding_mode="circular", bias=False)
circular.weight.data = conv.weight.detach().clone()
basis = torch.eye(conv.in_channels * n * n).reshape(-1, conv.in_channels, n, n)
with torch.no_grad():
    A = circular(basis).reshape(basis.shape[0], -1).T.double()  # (O n², I n²)
explicit = torch.linalg.svdvals(A).numpy()
print(f"operator matrix {tuple(A.shape)}: largest σ explicit {explicit[0]:.4f}, via FFT {op[0]:.4f}")
assert np.allclose(np.sort(explicit), np.sort(op), atol=1e-4)

# %% [markdown]
# Two facts follow from the Fourier picture, and both hold exactly:
#
# * **Parseval**: every kernel entry appears $n^2$ times in the operator, so
#   $\sum \sigma^2 = n^2 \lVert K \rVert_F^2$;
# * the zero frequency is $\hat K(0, 0) = \sum_{a,b} K[:, :, a, b]$ (the response to a
#   constant image), so the operator norm is at least $\lVert \hat K(0, 0) \rVert_2$.

# %%
K = conv.weight.detach().double()
assert np.isclose((op.astype(np.float64) ** 2).sum(), n * n * float((K ** 2).sum()), rtol=1e-5)
dc = float(torch.linalg.matrix_norm(K.sum(dim=(2, 3)), ord=2))
flat_norm = ts.spectrum(model, "features.3").spectral_norm
assert op[0] >= dc - 1e-6
print(f"Σσ² = {(op ** 2).sum():.2f} = n²‖K‖² = {n * n * float((K ** 2).sum()):.2f};  "
      f"‖op‖₂ = {op[0]:.3f} ≥ ‖K̂(0,0)‖₂ = {dc:.3f};  matricized ‖K‖₂ = {flat_norm:.3f}")

# %% [markdown]
# Truncating the matricized kernel to rank $r$ (the `svd` method) makes every
# $\hat K(u, v)$ rank $\le r$, so the operator keeps at most $n^2 r$ non-zero singular
# values. LeNet's conv sees 12 x 12 inputs; compare the operator spectra at $n = 12$.

# %%
n, r_conv = 12, 8
op_full = ts.operator_spectrum(conv, n)
conv_r = ts.preview(model, ts.Plan({"features.3": {"method": "svd", "rank": r_conv}})).features[3]
op_r = ts.operator_spectrum(conv_r, n)
nonzero = int((op_r > 1e-5 * op_r[0]).sum())
print(f"rank {r_conv}: {nonzero} non-zero operator singular values of {len(op_r)} (bound n²r = {n * n * r_conv})")
assert nonzero <= n * n * r_conv
floor = op_full[0] * 1e-6
(hv.Curve((np.arange(1, len(op_full) + 1), op_full), "index", "operator σ", label="dense")
 * hv.Curve((np.arange(1, len(op_r) + 1), np.clip(op_r, floor, None)), label=f"svd rank {r_conv}")).opts(
    logy=True, width=600, height=300, legend_position="bottom_left",
    title=f"features.3 as an operator on {n}x{n} images")

# %% [markdown]
# ## A slider: truncate a layer, watch error, size and accuracy
#
# `ts.preview(model, plan)` evaluates the original architecture with the truncated weight
# in place (exactly what the factorized pair computes, without building it), so each move
# of the slider costs one matrix product from the cached SVD and one pass over the 1000
# test digits.

# %%
layer_names = [l.name for l in layers]
layer_box = widgets.Dropdown(options=layer_names, value=name, description="layer")
slider = widgets.IntSlider(value=spec.max_rank, min=1, max=spec.max_rank, description="rank",
                           continuous_update=False)
readout = widgets.HTML()
state = {}


def update(change=None):
    n_layer, rank = layer_box.value, slider.value
    sp = ts.spectrum(model, n_layer)
    g = ts.LayerGeometry.of(model.get_submodule(n_layer))
    net = ts.preview(model, ts.Plan({n_layer: {"method": "svd", "rank": rank}}))
    acc = ts.evaluate(net, ex.test_loader())["accuracy"]
    params = ts.count_params(model) - g.dense_params + svd.count_params(g, rank)
    size = (f"{ts.count_params(model) / params:.2f}x fewer" if params < ts.count_params(model)
            else "past break-even: keep this layer dense")
    state.update(layer=n_layer, rank=rank, error=sp.relative_error(rank), params=params, accuracy=acc)
    readout.value = (f"<b>{n_layer}</b> at rank {rank}: relative weight error {sp.relative_error(rank):.3f}, "
                     f"energy kept {sp.retained_energy(rank):.1%}; network {params:,} parameters "
                     f"({size}); test accuracy <b>{acc:.1%}</b> (dense {ex.accuracy:.1%})")


def on_layer(change):
    slider.unobserve(update, names="value")  # move the slider without evaluating the old layer
    slider.max = ts.spectrum(model, layer_box.value).max_rank
    slider.value = slider.max
    slider.observe(update, names="value")
    update()


layer_box.observe(on_layer, names="value")
slider.observe(update, names="value")
update()
widgets.VBox([layer_box, slider, readout])

# %% [markdown]
# The widgets are ordinary objects, so code can move them too. At full rank the
# truncation is exact and the accuracy is the original's, for every layer; at rank 8,
# `classifier.1` keeps under 3% of its parameters.

# %%
assert state["rank"] == spec.max_rank and state["accuracy"] == ex.accuracy
layer_box.value = "features.3"
print(readout.value)
assert state["layer"] == "features.3" and state["rank"] == 50 and state["accuracy"] == ex.accuracy
layer_box.value = name
slider.value = 8
print(readout.value)
assert state["rank"] == 8 and np.isclose(state["error"], spec.relative_error(8))
assert state["params"] == ts.count_params(model) - geom.dense_params + svd.count_params(geom, 8)
assert state["accuracy"] > 0.85

# %% [markdown]
# The built model agrees with the preview: the same accuracy, from a network that is
# really that small.

# %%
built8 = ts.compress(model, ts.Plan({name: {"method": "svd", "rank": 8}}))
assert ts.count_params(built8) == state["params"]
acc8 = ts.evaluate(built8, ex.test_loader())["accuracy"]
assert abs(acc8 - state["accuracy"]) <= 0.002  # float rounding may flip one digit in a thousand
print(f"built model: {ts.count_params(built8):,} parameters, accuracy {acc8:.1%}")

# %% [markdown]
# Now the whole curve for `classifier.1`: accuracy against rank, next to the weight error.

# %%
sweep = [1, 2, 4, 8, 16, 32, 64, 128, 256, spec.max_rank]
acc_by_rank = []
for k in tqdm(sweep, desc="ranks"):
    slider.value = k
    acc_by_rank.append(state["accuracy"])
errs = [spec.relative_error(k) for k in sweep]
(hv.Curve((sweep, acc_by_rank), "rank r", "test accuracy", label="accuracy").opts(logx=True, tools=["hover"])
 + hv.Curve((sweep, errs), "rank r", "relative weight error", label="weight error").opts(logx=True)).opts(
    hv.opts.Curve(width=380, height=300))

# %%
i16 = sweep.index(16)
print(f"rank 16: weight error {errs[i16]:.2f} but accuracy {acc_by_rank[i16]:.1%} (dense {ex.accuracy:.1%})")
assert errs[i16] > 0.5 and acc_by_rank[i16] >= ex.accuracy - 0.01
assert acc_by_rank[-1] == ex.accuracy

# %% [markdown]
# **The lesson of the slider.** At rank 16 the weight has lost most of its Frobenius norm
# (error above 0.5), yet the network classifies as well as before. The directions that
# the truncation throws away are directions the *data* hardly excites: the layer's inputs
# are not spread evenly over $\mathbb{R}^{800}$. Weight error is a pessimistic proxy;
# chapter 4 replaces it by the error on the layer's actual inputs (data-aware
# compression), and chapters 2 and 3 give convolutions and large matrices better-suited
# factorizations.
#
# ## Summary
#
# * The SVD orders a layer's rank-one pieces by $\sigma_i$; truncating to $r$ is the best
#   rank-$r$ layer, and its relative error is $\sqrt{\sum_{i>r}\sigma_i^2 / \sum_i
#   \sigma_i^2}$ (checked above to $10^{-5}$).
# * Energy, effective rank and stable rank summarise a spectrum; training lowers the
#   stable rank far more than the effective rank.
# * A convolution's operator spectrum is the union of the spectra of its kernel's
#   Fourier coefficients; `svd` on the matricized kernel caps each one's rank.
# * Weight error overstates the damage: accuracy holds at ranks whose weight error is
#   large.
#
# **References.** Eckart and Young, *Psychometrika* 1936. Roy and Vetterli, *The effective
# rank*, EUSIPCO 2007. Sedghi, Gupta and Long, *The singular values of convolutional
# layers*, ICLR 2019. Martin and Mahoney, *Implicit self-regularization in deep neural
# networks*, JMLR 2021. Denton et al., NeurIPS 2014.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
