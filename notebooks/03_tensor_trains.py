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
# # 3. Tensor Trains
#
# A low-rank matrix needs $r(m + n)$ numbers. A *tensor train* needs far fewer: it
# reshapes a big matrix into a high-order tensor and stores it as a chain of small
# three-way cores. Novikov et al. (2015) compressed a fully-connected layer of VGG by a
# factor of 200 000 this way; Garipov et al. (2016) did the same for convolutions.
#
# **You will learn to**
#
# 1. reshape a matrix into a high-order tensor, and see why a Kronecker product becomes
#    rank one;
# 2. run TT-SVD (Oseledets 2011) and check its error bound;
# 3. turn a fully-connected layer into a TT-matrix layer (Novikov et al. 2015) whose
#    forward pass never builds the weight, with compression ratios in the thousands;
# 4. see how the factorization of the dimensions changes the result;
# 5. compress a convolution as a TT-conv (Garipov et al. 2016).

# %%
import math
import time
import warnings

import holoviews as hv
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
from tensorscope.examples import load_example
from tensorscope.methods.tt import tt_shapes, tt_svd

hv.extension("bokeh")
torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread avoids contention on a busy 2-core machine
T0 = time.perf_counter()
tt = ts.get_method("tt")

# %% [markdown]
# ## A matrix is a tensor in disguise
#
# Write the row index of an $M \times N$ matrix in mixed radix, $i \leftrightarrow (i_1,
# \dots, i_d)$ with $M = m_1 \cdots m_d$, and the column index likewise with
# $N = n_1 \cdots n_d$. Then $W$ is a $2d$-way tensor, and pairing each row digit with its
# column digit gives a $d$-way tensor with modes of size $m_k n_k$:
#
# $$\mathcal W\big((i_1, j_1), (i_2, j_2), \dots, (i_d, j_d)\big) = W(i, j).$$
#
# The simplest structure this reveals is the Kronecker product. If $W = A \otimes B$ with
# $A$ of size $m_1 \times n_1$ and $B$ of size $m_2 \times n_2$, then
# $W\big((i_1,i_2),(j_1,j_2)\big) = A(i_1, j_1)\, B(i_2, j_2)$: with shapes $(m_1, m_2)$ and
# $(n_1, n_2)$ the 2-way tensor is an outer product, **rank one**, although $W$ itself has
# full rank.

# %%
gen = torch.Generator().manual_seed(0)
A, B = torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)
kron = torch.nn.Linear(1024, 1024)
kron.weight.data = torch.kron(A, B)
print(f"matrix rank of A ⊗ B: {torch.linalg.matrix_rank(kron.weight).item()} of 1024")

geom_k = ts.LayerGeometry.of(kron)
rows = []
Wk = kron.weight.detach()
for ins, outs in [([32, 32], [32, 32]), ([16, 64], [16, 64]), ([64, 16], [64, 16])]:
    opts = {"in_shape": ins, "out_shape": outs}
    rank = tt.resolve_rank(geom_k, 1, opts)
    W1 = tt.reconstruct(kron, tt.factorize(kron, rank, opts))
    rows.append({"in_shape": ins, "out_shape": outs, "exact TT ranks ≤": tt.max_rank(geom_k, opts),
                 "params at rank 1": tt.count_params(geom_k, rank, opts) - 1024,
                 "error at rank 1": float((W1 - Wk).norm() / Wk.norm())})
kron_table = pd.DataFrame(rows)
kron_table

# %%
assert kron_table["error at rank 1"].iloc[0] < 1e-5  # aligned with the Kronecker structure: exact
assert (kron_table["error at rank 1"].iloc[1:] > 0.5).all()  # misaligned: useless at rank 1
print(f"1,048,576 weights stored exactly in {kron_table['params at rank 1'].iloc[0]:,} numbers")

# %% [markdown]
# With four cores, splitting each 32 as $4 \cdot 8$, the Kronecker split falls on the
# middle bond: that bond needs rank 1 and only the outer ones carry more. The choice of
# factorization decides what structure a tensor train can see; we come back to this on a
# trained layer.

# %%
opts4 = {"in_shape": [4, 8, 8, 4], "out_shape": [4, 8, 8, 4]}
print("exact bond ranks at most", tt.max_rank(geom_k, opts4))
W4 = tt.reconstruct(kron, tt.factorize(kron, (1, 16, 1, 16, 1), opts4))
err4 = float((W4 - Wk).norm() / Wk.norm())
numbers4 = tt.count_params(geom_k, (1, 16, 1, 16, 1), opts4) - 1024  # without the bias
print(f"bond ranks (1, 16, 1, 16, 1): error {err4:.1e} with {numbers4:,} numbers")
assert err4 < 1e-5
#
# ## TT-SVD
#
# A tensor train writes a $d$-way tensor as a product of matrices, one per index:
#
# $$T[i_1, \dots, i_d] = G_1[i_1]\, G_2[i_2] \cdots G_d[i_d], \qquad G_k[i_k] \in
#   \mathbb{R}^{r_{k-1} \times r_k},\ r_0 = r_d = 1.$$
#
# The cores $G_k$ are $r_{k-1} \times n_k \times r_k$ arrays: $\sum_k r_{k-1} n_k r_k$
# numbers instead of $\prod_k n_k$. TT-SVD (Oseledets 2011) finds them with $d - 1$
# truncated SVDs: reshape $T$ to $n_1 \times (n_2 \cdots n_d)$, keep the top $r_1$ left
# singular vectors as $G_1$, carry $\Sigma V^\top$ forward, reshape it to
# $(r_1 n_2) \times (n_3 \cdots n_d)$, and repeat. Its error obeys
#
# $$\lVert T - T_\text{TT} \rVert_F^2 \le \sum_{k=1}^{d-1} \varepsilon_k^2,$$
#
# where $\varepsilon_k$ is the Eckart-Young tail of the $k$-th unfolding
# $T_{\langle k \rangle} \in \mathbb{R}^{(n_1 \cdots n_k) \times (n_{k+1} \cdots n_d)}$ at
# rank $r_k$. Check the bound on a random tensor:

# %%
def tt_error(T, cores):
    full = cores[0]
    for c in cores[1:]:
        full = torch.tensordot(full, c, dims=([-1], [0]))
    return float(torch.linalg.norm(full.reshape(T.shape) - T))


T = torch.randn(6, 5, 7, 4, 6, generator=gen, dtype=torch.float64)
ranks = [1, 3, 8, 6, 3, 1]
bound = 0.0
for k in range(1, T.dim()):
    s = torch.linalg.svdvals(T.reshape(math.prod(T.shape[:k]), -1))
    bound += float((s[ranks[k]:] ** 2).sum())
err = tt_error(T, tt_svd(T, ranks))
print(f"TT-SVD error {err:.4f} ≤ bound {math.sqrt(bound):.4f}")
assert err <= math.sqrt(bound) + 1e-9

# %% [markdown]
# A random tensor is incompressible. Smooth functions are the opposite: sample
# $f(x_1, \dots, x_d) = \sin(x_1 + \dots + x_d)$ on a grid of 4 points per axis in
# $d = 10$ dimensions. The tensor has $4^{10} \approx 10^6$ entries, but
# $\sin(a + b) = \sin a \cos b + \cos a \sin b$ makes every unfolding rank 2, so a TT of
# ranks 2 holds it exactly in $\le 2 \cdot 2 \cdot 4 \cdot 10 = 160$ numbers.

# %%
d, n_pts = 10, 4
grid = torch.linspace(0, 1, n_pts, dtype=torch.float64)
total = sum(grid.reshape([n_pts if j == k else 1 for j in range(d)]) for k in range(d))
S = torch.sin(total)
sin_rows = []
for r in (1, 2, 3):
    cores = tt_svd(S, [1] + [r] * (d - 1) + [1])
    sin_rows.append({"rank": r, "numbers": sum(c.numel() for c in cores),
                     "relative error": tt_error(S, cores) / float(torch.linalg.norm(S))})
sin_table = pd.DataFrame(sin_rows)
assert sin_table["relative error"].iloc[1] < 1e-10 and sin_table["relative error"].iloc[0] > 1e-3
print(f"{S.numel():,} entries")
sin_table

# %% [markdown]
# The reason, in one picture: every unfolding $S_{\langle k \rangle}$ (the first $k$ indices
# as rows) has exactly two non-zero singular values, and TT-SVD's ranks are these
# unfolding ranks.

# %%
unfold = []
for k in range(1, d):
    sv = torch.linalg.svdvals(S.reshape(n_pts ** k, -1))
    unfold += [(k, i + 1, float(v)) for i, v in enumerate(sv[:4] / sv[0])]
unfold = pd.DataFrame(unfold, columns=["k", "i", "σ_i / σ_1"])
assert (unfold[unfold.i <= 2]["σ_i / σ_1"] > 1e-3).all() and (unfold[unfold.i > 2]["σ_i / σ_1"] < 1e-12).all()
hv.Overlay([hv.Scatter(g, "k", "σ_i / σ_1", label=f"σ_{i}").opts(size=8)
            for i, g in unfold.assign(**{"σ_i / σ_1": unfold["σ_i / σ_1"].clip(lower=1e-17)}).groupby("i")]).opts(
    logy=True, width=560, height=300, legend_position="right", xlabel="unfolding k",
    title="sin(x₁ + … + x₁₀): the top 4 singular values of each unfolding")

# %% [markdown]
# ## TT-matrix layers (Novikov et al. 2015)
#
# Combine the two ideas: reshape a weight $W$ ($M = \prod m_k$ outputs, $N = \prod n_k$
# inputs) into the $d$-way tensor with modes $m_k n_k$ and store it as a TT. Each core is
# now a 4-way array $G_k \in \mathbb{R}^{r_{k-1} \times m_k \times n_k \times r_k}$:
#
# $$W\big((i_1, \dots, i_d), (j_1, \dots, j_d)\big) = G_1[i_1, j_1]\, G_2[i_2, j_2] \cdots
#   G_d[i_d, j_d], \qquad \#\text{params} = \sum_k r_{k-1}\, m_k\, n_k\, r_k.$$
#
# The layer computes $y = W x$ by contracting $x$ (reshaped to $n_1 \times \dots \times
# n_d$) with one core at a time, a sequence of small matrix products; $W$ is never formed.
#
# The example here is the `mlp` network, 784-1024-1024-10, the network Novikov et al.
# tensorize. Its `fc2` is a 1024 x 1024 matrix; `tt_shapes` proposes a balanced
# factorization.

# %%
ex = load_example("mlp", progress=True)
model = ex.model
print(f"mlp: {ts.count_params(model):,} parameters, test accuracy {ex.accuracy:.1%}")
name = "fc2"
layer = model.get_submodule(name)
geom = ts.LayerGeometry.of(layer)
in_shape, out_shape = tt_shapes(geom.in_features, geom.out_features)
print(f"{name}: in 1024 = {' x '.join(map(str, in_shape))}, out 1024 = {' x '.join(map(str, out_shape))}; "
      f"bond ranks at which TT is exact: {tt.max_rank(geom)}")

# %%
small = ts.compress(model, ts.Plan({name: {"method": "tt", "rank": 2}}))
tt_layer = small.get_submodule(name)
print(tt_layer)
weights = geom.dense_params - geom.out_features
tt_weights = sum(p.numel() for n, p in tt_layer.named_parameters() if "core" in n)
print(f"weights: {weights:,} dense, {tt_weights:,} in the TT cores: {weights / tt_weights:,.0f}x fewer")
assert weights / tt_weights >= 1000
assert tt.count_params(geom, 2) == sum(p.numel() for p in tt_layer.parameters())  # predicted = built (bias too)
assert tt_weights == sum(r0 * m * n_ * r1 for r0, m, n_, r1 in
                         zip((1, 2, 2, 2), out_shape, in_shape, (2, 2, 2, 1)))

# %% [markdown]
# Compression ratios in the thousands: the TT-matrix of rank 2 holds 384 numbers for a
# million weights (the 1024 biases are kept as they are). The forward pass is cheap too;
# the library's FLOP count (which picks the cheaper of two contraction orders) matches
# torch's own counter:

# %%
x = torch.randn(1, 1024)
flops_tt = ts.count_flops(tt_layer, x)
assert flops_tt == tt.count_flops(geom, tt.resolve_rank(geom, 2))
print(f"FLOPs per sample: dense {geom.dense_flops:,}, TT rank 2 {flops_tt:,} "
      f"({geom.dense_flops / flops_tt:.0f}x fewer)")

# %% [markdown]
# And at the maximal bond ranks the TT layer is exact:

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ts.BreakEvenWarning)
    exact = ts.compress(model, ts.Plan({name: {"method": "tt", "rank": list(tt.max_rank(geom))}}))
x_test = ex.example_input(64)
with torch.no_grad():
    torch.testing.assert_close(exact(x_test), model(x_test), rtol=1e-4, atol=1e-4)
print("TT at full bond ranks reproduces the network's outputs")

# %% [markdown]
# ### Accuracy of a truncated trained layer
#
# Compressing `fc2` by TT-SVD straight from the trained weights, at increasing ranks:

# %%
tt_ranks = [1, 2, 4, 8, 16, 32, 64]
rows = []
for r in tqdm(tt_ranks, desc="TT ranks"):
    net = ts.compress(model, ts.Plan({name: {"method": "tt", "rank": r}}))
    p = tt.count_params(geom, r) - geom.out_features
    rows.append({"rank": r, "TT weights": p, "compression": weights / p,
                 "accuracy": ts.evaluate(net, ex.test_loader())["accuracy"]})
truncated = pd.DataFrame(rows)
truncated.round(3)

# %%
assert truncated.accuracy.iloc[0] < 0.5 and truncated.accuracy.iloc[-1] > truncated.accuracy.iloc[0] + 0.5
(hv.Curve(truncated, "compression", ["accuracy", "rank"]).opts(tools=["hover"])
 * hv.Scatter(truncated, "compression", "accuracy").opts(size=6)
 * hv.HLine(ex.accuracy).opts(color="gray", line_dash="dashed")).opts(
    logx=True, invert_xaxis=True, width=600, height=320, xlabel="compression (x fewer weights)",
    title="fc2 as a TT-matrix, no training")

# %% [markdown]
# A trained dense matrix is *not* a low-rank tensor train: at high compression TT-SVD
# discards nearly all of it and the network guesses. Novikov et al. **train** their TT
# layers. Starting from the TT-SVD cores, a few hundred steps of distillation from the
# dense network (`ts.finetune`) are enough here:

# %%
tuned = ts.finetune(small, ex.train_loader(batch_size=64, shuffle=True), teacher=model, steps=400, lr=3e-3,
                    progress=True)
acc_tuned = ts.evaluate(tuned, ex.test_loader())["accuracy"]
acc_before = truncated.set_index("rank").accuracy[2]
print(f"fc2 at TT rank 2 ({weights / tt_weights:,.0f}x fewer weights): accuracy {acc_before:.1%} after TT-SVD, "
      f"{acc_tuned:.1%} after fine-tuning (dense {ex.accuracy:.1%})")
assert acc_tuned >= ex.accuracy - 0.02

# %% [markdown]
# ## The factorization of the dimensions matters
#
# For `fc2` there are many ways to write $1024 = \prod m_k = \prod n_k$. More cores mean
# smaller modes and fewer parameters per rank, but each bond must carry more. The weight
# error of TT-SVD across ranks, for several numbers of cores $d$ and one reordering:

# %%
W = layer.weight.detach()
shapes = {f"d={k}: {tt_shapes(1024, 1024, k)[0]} x {tt_shapes(1024, 1024, k)[1]}": tt_shapes(1024, 1024, k)
          for k in (2, 3, 4, 5)}
shapes["d=4 reordered: [4, 4, 8, 8] x [4, 4, 8, 8]"] = ([4, 4, 8, 8], [4, 4, 8, 8])
curves, shape_rows = [], []
for label, (ins, outs) in tqdm(shapes.items(), desc="factorizations"):
    opts = {"in_shape": ins, "out_shape": outs}
    pts = []
    for r in (2, 4, 8, 16, 32, 64):
        rank = tt.resolve_rank(geom, r, opts)
        Wr = tt.reconstruct(layer, tt.factorize(layer, rank, opts))
        pts.append((tt.count_params(geom, rank, opts) - 1024, float((Wr - W).norm() / W.norm())))
        shape_rows.append({"shape": label, "rank": r, "params": pts[-1][0], "error": pts[-1][1]})
    curves.append(hv.Curve(pts, "TT parameters", "relative weight error", label=label))
svd_curve = ts.tradeoff(layer, "svd", name)
curves.append(hv.Curve((svd_curve.params - 1024, svd_curve.errors), label="svd (matrix rank)").opts(
    color="black", line_dash="dashed"))
hv.Overlay(curves).opts(logx=True, width=680, height=360, legend_position="bottom_left",
                        xlim=(500, 1.2e6), title="fc2: TT-SVD error for different factorizations")

# %%
shape_df = pd.DataFrame(shape_rows)
at_16 = shape_df[shape_df["rank"] == 16].set_index("shape")
at_16

# %% [markdown]
# At rank 16 the 2-core train is the most accurate but also the largest; more cores
# buy orders of magnitude in size for a little error, and *which* factor goes where
# changes both (compare the two `d=4` rows: same factors, different order). On this
# trained layer every TT-SVD curve lies above the plain SVD at equal size: the structure a
# tensor train exploits has to be learned, as the fine-tuning above did.

# %%
d2 = [k for k in at_16.index if k.startswith("d=2")][0]
d5 = [k for k in at_16.index if k.startswith("d=5")][0]
assert at_16.loc[d2, "params"] > 2 * at_16.loc[d5, "params"] and at_16.loc[d2, "error"] < at_16.loc[d5, "error"]
spec = ts.spectrum(model, name)
for row in shape_df.itertuples():  # the SVD with no more parameters is at least as accurate
    if row.params >= 2048:
        assert spec.relative_error(min(row.params // 2048, spec.max_rank)) <= row.error + 1e-9, row
reord = [k for k in at_16.index if "reordered" in k][0]
d4 = [k for k in at_16.index if k.startswith("d=4:")][0]
assert at_16.loc[reord, "params"] != at_16.loc[d4, "params"]

# %% [markdown]
# ## TT-conv (Garipov et al. 2016)
#
# A conv kernel $K \in \mathbb{R}^{O \times I \times k_h \times k_w}$ gets the same
# treatment with one extra core for space: factor the channels as $O = \prod m_k$,
# $I = \prod n_k$ and put the $k_h k_w$ spatial positions in a first core,
#
# $$K\big((i_1..i_d), (j_1..j_d), y, x\big) = G_0[(y, x)]\; G_1[i_1, j_1] \cdots G_d[i_d, j_d],$$
#
# with $G_0 \in \mathbb{R}^{1 \times k_h k_w \times r_1}$. The forward pass first filters
# every input channel with $r_1$ spatial filters (a small convolution that keeps the
# layer's stride and padding), then contracts the channel cores at every output position.
#
# On the `resnet8` example, whose channel counts (16, 32, 64) factor well, take the last
# 3 x 3 conv, 64 → 64 channels:

# %%
ex_r = load_example("resnet8", progress=True)
resnet = ex_r.model
conv_name = "layer3.conv2"
conv = resnet.get_submodule(conv_name)
geom_c = ts.LayerGeometry.of(conv, in_size=(7, 7))
print(f"resnet8: accuracy {ex_r.accuracy:.1%}; {conv_name}: {tuple(conv.weight.shape)}, "
      f"channels as {tt_shapes(64, 64)}, exact bond ranks {tt.max_rank(geom_c)}")
tt_conv = ts.compress(resnet, ts.Plan({conv_name: {"method": "tt", "rank": 16}}))
print(tt_conv.get_submodule(conv_name))

# %%
x7 = torch.randn(2, 64, 7, 7)
built_conv = tt_conv.get_submodule(conv_name)
assert tt.count_params(geom_c, 16) == sum(p.numel() for p in built_conv.parameters())
assert tt.count_flops(geom_c, tt.resolve_rank(geom_c, 16)) == ts.count_flops(built_conv, x7[:1])
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ts.BreakEvenWarning)
    full_conv = ts.compress(resnet, ts.Plan({conv_name: {"method": "tt", "rank": list(tt.max_rank(geom_c))}}))
with torch.no_grad():
    torch.testing.assert_close(full_conv.get_submodule(conv_name)(x7), conv(x7), rtol=1e-4, atol=1e-4)
print("TT-conv: predicted parameters and FLOPs equal the built module's; exact at full bond ranks")

# %% [markdown]
# Accuracy against compression of this one layer, TT-conv next to Tucker-2 (chapter 2)
# at similar sizes, straight from the trained weights:

# %%
conv_rows = []
jobs = [("tt", r) for r in (4, 8, 16, 32)] + [("tucker2", f) for f in (0.1, 0.25, 0.5)]
for method, rank in tqdm(jobs, desc="resnet8 layer3.conv2"):
    net = ts.compress(resnet, ts.Plan({conv_name: {"method": method, "rank": rank}}))
    p = sum(q.numel() for q in net.get_submodule(conv_name).parameters())
    conv_rows.append({"method": method, "rank": rank, "params": p, "compression": geom_c.dense_params / p,
                      "accuracy": ts.evaluate(net, ex_r.test_loader())["accuracy"]})
conv_df = pd.DataFrame(conv_rows)
conv_df.round(3)

# %%
(hv.Overlay([hv.Curve(conv_df[conv_df.method == m], "compression", ["accuracy", "rank"], label=m).opts(tools=["hover"])
             * hv.Scatter(conv_df[conv_df.method == m], "compression", "accuracy").opts(size=6)
             for m in ("tt", "tucker2")])
 * hv.HLine(ex_r.accuracy).opts(color="gray", line_dash="dashed")).opts(
    logx=True, width=600, height=320, legend_position="bottom_left", title=f"resnet8 {conv_name}, no training")

# %%
assert conv_df[conv_df.method == "tt"].accuracy.max() >= ex_r.accuracy - 0.05
assert conv_df[(conv_df.method == "tt") & (conv_df["rank"] == 4)].accuracy.iloc[0] < ex_r.accuracy - 0.2

# %% [markdown]
# As with `fc2`, post-hoc TT-SVD of a trained kernel loses more than Tucker-2 at equal
# size; Garipov et al. reach 80x on CIFAR-10 by training the TT-conv network, and sixty
# steps of fine-tuning recover most of it here too:

# %%
tt_conv8 = ts.compress(resnet, ts.Plan({conv_name: {"method": "tt", "rank": 8}}))
before = ts.evaluate(tt_conv8, ex_r.test_loader())["accuracy"]
tuned_conv = ts.finetune(tt_conv8, ex_r.train_loader(batch_size=64, shuffle=True), teacher=resnet, steps=60,
                         lr=3e-4, eval_every=15, progress=True)
after = ts.evaluate(tuned_conv, ex_r.test_loader())["accuracy"]
p8 = tt.count_params(geom_c, 8)
print(f"{conv_name} as TT-conv rank 8 ({geom_c.dense_params / p8:.0f}x fewer parameters): "
      f"accuracy {before:.1%} → {after:.1%} after fine-tuning (dense {ex_r.accuracy:.1%})")
assert after > before + 0.1 and after >= ex_r.accuracy - 0.05

# %% [markdown]
# ## Summary
#
# * Reshaping a matrix into a $d$-way tensor with modes $m_k n_k$ exposes Kronecker-like
#   structure; a TT stores it in $\sum_k r_{k-1} m_k n_k r_k$ numbers.
# * TT-SVD is $d - 1$ truncated SVDs, with error at most the root sum of squares of the
#   unfolding tails.
# * A TT-matrix layer reaches compression in the thousands for one layer and computes its
#   forward pass from the cores; a trained dense layer is not TT-low-rank, so it must be
#   (re)trained in TT form, which takes seconds here.
# * The factorization of the dimensions (number of cores, their order) changes size and
#   error; TT-conv adds a spatial core in front.
#
# **References.** Oseledets, *Tensor-Train decomposition*, SIAM J. Sci. Comput. 2011.
# Novikov, Podoprikhin, Osokin and Vetrov, *Tensorizing neural networks*, NeurIPS 2015.
# Garipov, Podoprikhin, Novikov and Vetrov, *Ultimate tensorization: compressing
# convolutional and FC layers alike*, arXiv:1611.03214, 2016.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
