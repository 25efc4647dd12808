"""Trials for MiniLM at 50% behind the table "How the augmentation was chosen" in docs/benchmarks.md.

    [AUG=copies,rate] [WRAP=1] python bench/minilm_trials.py VARIANTS:m|n:c|n[:ridge] ...

VARIANTS: a key of ``V`` below; ``m``: the end-to-end check on (``measure=``); ``c``: sequential
correction. ``AUG``: calibration augmented by token replacement; ``WRAP=1``: output loss on the
pooled, normalised embedding. Prints the evaluation cosine and, from calibration data alone,
the cosine on each half's original sentences of factors fitted on the other half. Statistics
are pickled under /tmp and reused across trials.
"""
import sys, time, pickle, warnings, os, json
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
import real_networks as rn
import tensorscope as ts
from tensorscope.allocation import measured_damage
warnings.simplefilter("ignore")
net = rn.MiniLM(); rn.sizes(net)
keep = rn.keep_total(net, 0.5)
WRAP = os.environ.get("WRAP") == "1"
class Emb(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        msk = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * msk).sum(1) / msk.sum(1), dim=-1).unsqueeze(1)
MODEL = Emb(net.model).eval() if WRAP else net.model
LAYERS = ["m." + n for n in net.layers] if WRAP else net.layers
unwrap = (lambda s: s.m) if WRAP else (lambda s: s)
AUG = os.environ.get("AUG", "")
P = "/tmp/minilm_stats_p%s_w%d_a%s.pkl" % (os.environ.get("PROBES", "8"), WRAP, AUG)
CAL = net.calib
if AUG:
    c, r = AUG.split(",")
    CAL = net.augmented(int(c), float(r))
if os.path.exists(P):
    st = pickle.load(open(P, "rb"))
else:
    t0 = time.perf_counter()
    st = ts.collect_stats(MODEL, CAL, LAYERS, gradients=True, probes=int(os.environ.get("PROBES", "8")), grad_batch=16)
    print("stats", time.perf_counter() - t0, flush=True)
    pickle.dump(st, open(P, "wb"))

def embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
refc = [embed(net.model, b) for b in net.calib]

def clear():
    from tensorscope._cache import factor_cache
    factor_cache.clear()
    for s in st.values(): s._memo.clear()

V = {
 "w01": [{"shrinkage": 0.0, "fisher": 0.1}],
 "auto": "auto",
 "w05": [{"shrinkage": 0.0, "fisher": 0.5}],
 "w1": [{"shrinkage": 0.0, "fisher": 1.0}],
 "w0": [{"shrinkage": 0.0, "fisher": 0.0}],
 "wh": [{"shrinkage": 0.0}],
 "s01f01": [{"shrinkage": 0.1, "fisher": 0.1}],
 "s03f01": [{"shrinkage": 0.3, "fisher": 0.1}],
 "mix": [{"shrinkage": 0.0, "fisher": 0.1}, {"shrinkage": 0.1, "fisher": 0.1}, {"shrinkage": 0.3, "fisher": 0.1}],
 "mix2": [{"shrinkage": 0.0, "fisher": 0.1}, {"shrinkage": 0.0, "fisher": 0.5}, {"shrinkage": 0.1, "fisher": 0.1}, {"shrinkage": 0.1, "fisher": 0.5}],
}
for cfg in sys.argv[1:]:
    parts = cfg.split(":")  # variants:measure:correct[:ridge]
    var, meas, corr = parts[0], parts[1] == "m", parts[2] == "c"
    ridge = float(parts[3]) if len(parts) > 3 else None
    if ridge is not None:
        for s in st.values(): s.ridge = ridge
        for h in st.halves or []:
            for s in h.values(): s.ridge = ridge
    clear()
    t0 = time.perf_counter()
    plan = ts.plan_for_budget(MODEL, keep, layers=LAYERS, stats=st, data=CAL, allocation="output",
                              variants=V[var], measure=meas)
    tp = time.perf_counter() - t0
    small = ts.compress(MODEL, plan, stats=st)
    if corr:
        small = ts.correct(small, MODEL, CAL, stats=st)
    tt = time.perf_counter() - t0
    ev = net.score(unwrap(small))
    # calibration-only criterion: factors from one half, cosine + damage on the other
    a, b = st.halves
    hc, hd = [], []
    for fit, k in ((a, 1), (b, 0)):
        clear()
        sm = ts.compress(MODEL, plan, stats=fit)
        if corr:
            sm = ts.correct(sm, MODEL, [CAL[1 - k]], stats=fit)
        hc.append(float((embed(unwrap(sm), net.calib[k]) * refc[k]).sum(-1).mean()))
        hd.append(measured_damage(MODEL, sm, [net.calib[k]]))
    ranks = {n: getattr(e, "rank", None) for n, e in plan.layers.items()}
    kinds = {}
    for n in LAYERS:
        key = n.split(".")[-2] if "attention" in n else n.split(".")[-2] + "." + n.split(".")[-1]
        key = n.split(".", 4)[-1]
        r = ranks.get(n)
        kinds.setdefault(key, []).append(r)
    print(json.dumps({"cfg": cfg, "eval": round(ev, 4), "heldout_cos": [round(x, 4) for x in hc],
                      "heldout_dmg": [round(x, 2) for x in hd], "plan_s": round(tp, 1), "total_s": round(tt, 1)}), flush=True)
    print("   ", {k: v for k, v in kinds.items()}, flush=True)
    if ridge is not None:
        for s in st.values(): s.ridge = 1e-3
        for h in st.halves or []:
            for s in h.values(): s.ridge = 1e-3
