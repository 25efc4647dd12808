# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Training with tensor structure
#
# Notebook 3 fitted tensor trains to *trained* weights. Novikov et al. (2015) did
# something else as well: they built the TT layer first and trained its cores from
# scratch. A trained dense weight need not be close to any low-rank tensor train, but a
# network trained *inside* the structure only ever looks for weights that are.
#
# **You will learn to**
#
# 1. build TT layers with fresh cores (`ts.tensorize(model, plan, init="random")`) and
#    train them with `ts.train`;
# 2. compare them with post-hoc `compress` + `ts.finetune` at the same parameter count;
# 3. read what the two ways of running a TT layer (`"sweep"`, `"rebuild"`) cost;
# 4. see why a shuffled TT (`"shuffle": seed`) only makes sense from scratch;
# 5. apply the reshaped decompositions of Su et al. (2018), `rcp` and `rtucker`, to a conv;
# 6. decompose several same-shaped layers together, one core shared by all (a joint group, T-Net).

# %%
import time
import warnings

import holoviews as hv
import pandas as pd
import torch

try:
    import tensorscope as ts
except ImportError:  # a source checkout without `pip install -e .`: use the parent folder
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path.cwd().parent))
    import tensorscope as ts
from tensorscope.densify import probe_dense
from tensorscope.examples import load_example
from tensorscope.methods import LayerGeometry, get_group_method

hv.extension("bokeh")
torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread avoids contention on a busy 2-core machine
T0 = time.perf_counter()
tt = ts.get_method("tt")

# %% [markdown]
# ## A TT layer is a parametrisation, not only an approximation
#
# A TT-matrix layer (Novikov et al. 2015) stores the weight of an $M \times N$ layer,
# $M = \prod_k m_k$, $N = \prod_k n_k$, as a chain of cores $G_k$ of shape
# $r_{k-1} \times m_k \times n_k \times r_k$ ($r_0 = r_d = 1$):
#
# $$W\big((i_1,\dots,i_d),(j_1,\dots,j_d)\big) = G_1[i_1, j_1]\, G_2[i_2, j_2] \cdots G_d[i_d, j_d],$$
#
# with $\sum_k r_{k-1} m_k n_k r_k$ parameters instead of $MN$. Post-hoc compression picks
# the cores closest to a trained $W$ (TT-SVD); the error it leaves is what fine-tuning
# must repair. Training from scratch minimises the *loss* over the cores directly:
# gradient descent on $\{G_k\}$ through the chain rule, $\partial L/\partial G_k$ being a
# contraction of $\partial L/\partial W$ with the other cores. The cores start random,
# drawn so that the weight they form has Glorot variance $2/(N + M)$.
#
# The built-in `mlp` is the network of Novikov et al.: 784-1024-1024-10. We keep about
# 2% of its two large layers' parameters with one bond rank for both.

# %%
ex = load_example("mlp")
model = ex.model.eval()
train = ex.train_loader(batch_size=128, shuffle=True)
test = ex.test_loader()
EPOCHS = 3
steps = EPOCHS * len(train)


def accuracy(m):
    return float(ts.evaluate(m, test)["accuracy"])


fc = {n: model.get_submodule(n) for n in ("fc1", "fc2")}
dense_fc = sum(layer.weight.numel() + layer.bias.numel() for layer in fc.values())
# the largest bond rank whose TT layers keep at most 2% of fc1 + fc2
rank = max(r for r in range(1, 64)
           if sum(tt.count_params(LayerGeometry.of(layer), r) for layer in fc.values()) <= 0.02 * dense_fc)
plan = {n: {"method": "tt", "rank": rank, "batch": 128} for n in fc}
kept = sum(tt.count_params(LayerGeometry.of(layer), rank) for layer in fc.values())
print(f"bond rank {rank}: fc1 + fc2 keep {kept:,} of {dense_fc:,} parameters ({dense_fc / kept:.0f}x fewer)")

rows = [{"model": "dense mlp", "accuracy": accuracy(model), "seconds": 0.0}]
t = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    small = ts.compress(model, plan)
    rows.append({"model": "post-hoc: compress", "accuracy": accuracy(small), "seconds": time.perf_counter() - t})
    tuned = ts.finetune(small, train, teacher=model, steps=steps)
rows.append({"model": "post-hoc: + finetune", "accuracy": accuracy(tuned), "seconds": time.perf_counter() - t})

t = time.perf_counter()
fresh = ts.tensorize(model, plan, init="random", seed=0)
scratch, _ = ts.train(fresh, train, epochs=EPOCHS, optimizer="adam", lr=1e-3)
rows.append({"model": "from scratch: tensorize + train", "accuracy": accuracy(scratch),
             "seconds": time.perf_counter() - t})
assert ts.count_params(scratch) == ts.count_params(small)  # the same structure, the same size
pd.DataFrame(rows).round(3)

# %% [markdown]
# At this size the trained weight is far from any rank-16 tensor train: compressing it
# loses most of the accuracy, and fine-tuning (here with the dense network as teacher)
# recovers little of it in the same number of steps (`ts.finetune` also stops early when
# its held-out batch stops improving). Training inside the structure
# does better, because nothing has to be *undone*. (docs/benchmarks.md measures the same
# comparison over 10 epochs: 94.4% from scratch against 82.8% post-hoc at 52x.)
# One seed on 1000 test digits: differences under a point or so are noise.

# %% [markdown]
# ## Sweep or rebuild: what a TT layer costs to run
#
# A TT layer can run two ways. A **sweep** contracts the input with one core at a time
# and never forms $W$: cost per sample grows with the bond ranks, not with $MN$.
# A **rebuild** forms $W$ from the cores once per call and runs one dense product:
# forming $W$ costs about $2\, r\, MN$ FLOPs, shared among the batch, so it wins for
# large batches. `"mode": "auto"` (the default) lets a cost model pick for
# `"batch"` samples per call; `count_flops` follows the mode and reports FLOPs per sample.

# %%
geom = LayerGeometry.of(fc["fc1"])
cost = []
for batch in (1, 128):
    for mode in ("sweep", "rebuild"):
        opts = {"mode": mode, "batch": batch}
        cost.append({"batch": batch, "mode": mode,
                     "MFLOPs per sample": tt.count_flops(geom, rank, opts) / 1e6,
                     "auto picks": tt.resolve_mode(geom, rank, {"batch": batch})})
cost.append({"batch": "-", "mode": "dense", "MFLOPs per sample": geom.dense_flops / 1e6, "auto picks": "-"})
pd.DataFrame(cost).round(3)

# %% [markdown]
# Training runs at batch 128, where rebuilding is cheaper per sample, which is why the
# plan above says `"batch": 128`. Either mode computes the same function, so a layer
# trained in one mode can be run in the other (batch 1 inference: the sweep).
#
# ## Shuffled tensor trains: structure without locality
#
# A TT ties neighbouring digits of the row and column indices together. RsTD shuffles
# the flattened weight by a fixed permutation $\pi$ before reshaping it:
# $W = \operatorname{unvec}\big(P_\pi \operatorname{vec}(\mathrm{TT}(G_1,\dots,G_d))\big)$.
# The permutation is fixed by a seed, so it costs no parameters. From scratch this is as
# trainable as a plain TT. Post hoc it is not useful: the TT-SVD of a *shuffled trained*
# weight loses more than that of the weight itself, since shuffling destroys what
# structure the trained weight had. So `compress` refuses it and names the fix:

# %%
shuffled_plan = {n: {**e, "shuffle": 7} for n, e in plan.items()}
try:
    ts.compress(model, shuffled_plan)
except ts.PlanError as e:
    print(str(e)[:300], "...")
t = time.perf_counter()
shuffled, _ = ts.train(ts.tensorize(model, shuffled_plan, init="random", seed=0), train, epochs=EPOCHS,
                       optimizer="adam", lr=1e-3)
rows.append({"model": "from scratch, shuffled (RsTD)", "accuracy": accuracy(shuffled),
             "seconds": time.perf_counter() - t})
results = pd.DataFrame(rows)
results.round(3)

# %%
hv.Bars(results, "model", "accuracy").opts(
    width=720, height=320, xrotation=20, ylim=(0, 1), title=f"mlp, fc1 + fc2 as TT at bond rank {rank}",
    tools=["hover"],
)

# %% [markdown]
# ## Reshaped decompositions of a convolution
#
# Su et al. (2018) reshape a conv kernel $W \in \mathbb R^{O \times I \times k_h \times k_w}$
# by splitting the channels into sub-modes, $O = \prod_k o_k$ and $I = \prod_k i_k$, and then
# decompose the reshaped tensor:
#
# * **reshaped CP** (`rcp`): $W[o, i, :, :] = \sum_{r=1}^R \big(A_1^{(r)} \otimes \cdots \otimes
#   A_d^{(r)}\big)[o, i]\; S^{(r)}$ with $A_k^{(r)}$ of size $o_k \times i_k$ and a filter
#   $S^{(r)}$ of size $k_h \times k_w$: $R\,(\sum_k o_k i_k + k_h k_w)$ parameters;
# * **reshaped Tucker** (`rtucker`): one factor per channel sub-mode, the spatial modes
#   kept whole, $W = C \times_{o_1} U_1 \cdots \times_{o_d} U_d \times_{i_1} V_1 \cdots
#   \times_{i_d} V_d$. It runs as a Kronecker-factored 1x1 conv, the $k_h \times k_w$ core,
#   and another Kronecker-factored 1x1 conv; with one sub-mode it is `tucker2`;
# * **reshaped TT** is `tt` on a conv (notebook 3), with the spatial core first.
#
# `"in_shape"`/`"out_shape"` choose the sub-modes (default: two balanced factors each).
# Here is lenet5's second conv (20 to 50 channels, 5x5) at about the same parameter count
# in each method, compressed alone and not fine-tuned:

# %%
lenet = load_example("lenet5")
conv = lenet.model.get_submodule("features.3")
g = LayerGeometry.of(conv)
target = ts.get_method("cp").count_params(g, 32)
picks = {"cp": 32}
for name in ("tucker2", "rcp", "rtucker"):
    m = ts.get_method(name)
    ranks = [m.resolve_rank(g, r) for r in range(1, 200)] if name == "rcp" else \
        [m.resolve_rank(g, (a, b)) for a in range(1, 51) for b in range(1, 21)] if name == "tucker2" else \
        [m.resolve_rank(g, tuple(v)) for v in pd.MultiIndex.from_product(
            [range(1, x + 1) for x in m.max_rank(g)]).tolist()]
    ok = [r for r in dict.fromkeys(ranks) if m.count_params(g, r) <= target]
    picks[name] = max(ok, key=lambda r: m.count_params(g, r))
table = []
w = conv.weight.detach()
for name, r in picks.items():
    m = ts.get_method(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = m.factorize(conv, r)
        net = ts.compress(lenet.model, {"features.3": {"method": name, "rank": m.rank_to_json(r)}})
    table.append({"method": name, "rank": m.rank_text(r), "parameters": m.count_params(g, r),
                  "weight error": float((w - m.reconstruct(conv, f)).norm() / w.norm()),
                  "accuracy": float(ts.evaluate(net, lenet.test_loader())["accuracy"])})
print(f"dense features.3: {g.dense_params:,} parameters; dense lenet5 {lenet.accuracy:.3f}")
pd.DataFrame(table).round(3)

# %% [markdown]
# Fitted to a trained kernel, the reshaped forms do not beat their plain relatives at
# equal parameters: a Kronecker product of small channel matrices is a narrower family
# than an unconstrained rank-one term or a full channel projection. Like the tensor
# trains above, they are structures to *train*: `ts.tensorize` builds `rcp` and
# `rtucker` entries with random factors as it builds TT ones. A wrong sub-mode product
# is refused with the layer, the value and the fix:

# %%
try:
    ts.compress(lenet.model, {"features.3": {"method": "rtucker", "rank": 2, "in_shape": [4, 4]}})
except ts.PlanError as e:
    print(e)

# %% [markdown]
# ## One tensor for several layers: joint groups (T-Net)
#
# Everything so far decomposed one layer at a time. Kossaifi et al. (2019) noticed that
# the layers of a deep network are alike, and parametrised them *together*: stack the
# kernels of $L$ same-shaped convolutions into one tensor $\mathcal T[l, o, i, y, x]$ and
# give it one Tucker decomposition over the layer, output and input modes,
#
# $$\mathcal T \approx \mathcal C \times_l U_{\text{layer}} \times_o U_{\text{out}} \times_i U_{\text{in}},
# \qquad W_l = U_{\text{out}} \Big(\sum_a U_{\text{layer}}[l, a]\, \mathcal C[a]\Big) U_{\text{in}}^\top .$$
#
# The core $\mathcal C$ ($r_l \times r_o \times r_i \times k_h \times k_w$) and the channel
# factors are stored once for the whole group: $r_l r_o r_i k_h k_w + L r_l + O r_o + I r_i$
# parameters against $L$ times Tucker-2's $r_o r_i k_h k_w + O r_o + I r_i$. In a plan this is
# a **group** (plan format 2), with the method `joint_tucker` and the rank
# `[r_layer, r_out, r_in]`. The built-in `tower` has six identical 32 → 32 3x3 residual
# convs, `blocks.0.conv` ... `blocks.5.conv`:

# %%
tower = load_example("tower")
tnet = tower.model.eval()
MEMBERS = [f"blocks.{k}.conv" for k in range(6)]
jt = get_group_method("joint_tucker")
members = [tnet.get_submodule(n) for n in MEMBERS]
geoms = [LayerGeometry.of(m) for m in members]
six = sum(g.dense_params for g in geoms)
group_plan = {"tensorscope_plan": 2, "layers": {},
              "groups": {"tower": {"method": "joint_tucker", "layers": MEMBERS, "rank": [3, 8, 8]}}}
joint = ts.compress(tnet, group_plan)
shared = {id(joint.get_submodule(n).shared) for n in MEMBERS}
per_member = sum(p.numel() for n in MEMBERS for p in joint.get_submodule(n).parameters())
print(f"{len(shared)} shared core object for {len(MEMBERS)} members")
predicted = ts.plan_cost(tnet, group_plan)["params_after"]
print(f"parameters: {ts.count_params(joint):,} (plan_cost predicts {predicted:,}); counting the core "
      f"once per member would say {ts.count_params(tnet) - six + per_member:,}")
assert len(shared) == 1 and ts.count_params(joint) == predicted

# %% [markdown]
# `ts.count_params` (like `torch`'s `parameters()`) sees the shared core once, and so do
# `plan_cost`, the budget planner and the explorer, where a group is one row with its own
# rank sliders. Is sharing worth it? Give the six convs the same parameter budget either
# way, 1/55 and 1/24 of their 55,296 weights: the joint group at its rank triple of least
# HOSVD error, and six independent `tucker2` layers at the rank pair of least total error.
# Both are compressed from the trained tower, without any training.

# %%
tk = ts.get_method("tucker2")


def stacked_error(small):
    """Relative error of the six kernels stacked: what each member computes with against the original."""
    err = sum(float((probe_dense(small.get_submodule(n), m)[0].double() - m.weight.detach().double()).pow(2).sum())
              for n, m in zip(MEMBERS, members))
    return (err / sum(float(m.weight.detach().double().pow(2).sum()) for m in members)) ** 0.5


curve = jt.tradeoff_group(members, geoms)  # every rank triple's HOSVD error from one factorization
pairs = [(a, b) for a in range(1, 33) for b in range(1, 33)]
t2_params = {p: sum(tk.count_params(g, p) for g in geoms) for p in pairs}
t2_err = {p: sum(tk.cheap_error(m, p) ** 2 * float(m.weight.detach().pow(2).sum()) for m in members) for p in pairs}
equal = []
for ratio in (55, 24):
    budget = six / ratio
    k = min((k for k in range(len(curve.ranks)) if curve.params[k] <= budget), key=lambda k: curve.errors[k])
    ranks = {"joint_tucker": list(curve.ranks[k]),
             "tucker2": list(min((p for p in pairs if t2_params[p] <= budget), key=t2_err.get))}
    for name, r in ranks.items():
        group = {"tower": {"method": name, "layers": MEMBERS, "rank": r}}
        plan = ({"tensorscope_plan": 2, "layers": {}, "groups": group} if name == "joint_tucker"
                else {n: {"method": name, "rank": r} for n in MEMBERS})
        small = ts.compress(tnet, plan)
        equal.append({"budget": f"{ratio}x", "form": name, "rank": r,
                      "six convs' parameters": ts.count_params(small) - ts.count_params(tnet) + six,
                      "weight error": stacked_error(small),
                      "accuracy": float(ts.evaluate(small, tower.test_loader())["accuracy"])})
equal = pd.DataFrame(equal)
print(f"dense tower: {tower.accuracy:.3f}")
equal.round(3)

# %%
hv.Bars(equal, ["budget", "form"], "weight error").opts(
    width=520, height=300, ylim=(0, 1), tools=["hover"],
    title="tower's six convs at equal parameters: stacked kernel error")

# %% [markdown]
# Within the same budget the group spends its parameters better: one set of channel
# factors instead of six leaves room for a larger core, and its stacked weight error is
# the lower one (here 0.89 against 0.91 at 55x). With more room the gap narrows (0.85
# against 0.87 at 24x), since six independent layers each have factors fitted to their own
# kernel. Both errors are large: right after `compress` a residual tower this compressed
# is near chance either way, so the accuracy column says little; `bench/joint.py`
# fine-tunes both forms and trains them from scratch (docs/benchmarks.md). Whatever the
# budget, at full rank, `[6, 32, 32]`, the group is exact:

# %%
full_rank = list(jt.max_rank(geoms))
full = ts.compress(tnet, {"tensorscope_plan": 2, "layers": {},
                          "groups": {"tower": {"method": "joint_tucker", "layers": MEMBERS, "rank": full_rank}}})
x = next(iter(tower.test_loader()))[0][:64]
with torch.no_grad():
    torch.testing.assert_close(full(x), tnet(x), rtol=1e-4, atol=1e-4)
print(f"rank {full_rank}: stacked weight error {stacked_error(full):.1e}, outputs equal the dense tower's")
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Take-aways
#
# * A tensor structure can be trained from scratch: at a large compression factor that
#   beats compressing a trained network and fine-tuning it for the same number of steps.
# * Sweep and rebuild compute the same layer; the cheaper depends on the batch.
# * A shuffled TT drops the locality of the index digits; it is for training only.
# * Reshaped CP and Tucker split the channels into sub-modes; reshaped TT is `tt` on a conv.
# * A joint group stores what same-shaped layers have in common once (one core, counted
#   once); at a tight budget that fits the kernels better than independent Tucker-2.
#
# **References.** Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks",
# NeurIPS 2015. Su, Li, Bhattacharjee, Huang, "Tensorized spectrum preserving compression
# for neural networks", arXiv:1805.10352, 2018. Kossaifi, Bulat, Tzimiropoulos, Pantic, "T-Net:
# Parametrizing Fully Convolutional Nets with a Single High-Order Tensor", CVPR 2019.
