"""Large models: peak memory over the model's size, time per layer, and 2 processes against 1.

A synthetic model with a real architecture (transformers' ``LlamaConfig``, random weights
with decaying spectra, written as sharded safetensors with a Hugging Face index) is
streamed from disk: ``ts.spectra(folder)`` over every layer, then ``ts.compress(folder,
plan, out=...)`` with one process and with two (``torchrun --nproc-per-node 2``, gloo), one
thread each. Every phase runs in its own ``nice``'d subprocess, which reports its peak
resident memory (``VmHWM``, the kernel's high-water mark, read at its end; the parent
also samples each process's RSS with psutil every 50 ms) and its own timings.

    python bench/large_models.py                          # 0.5B parameters, 2.2 GB float32 (~15 min here)
    python bench/large_models.py --size 7b --decoder-layers 2 --spectra-layers 14
                                                          # Llama-2-7B's shapes: 27 GB of disk
    python bench/large_models.py --size tiny              # a smoke run (a minute)

The compress phase factorizes the layers of the first ``--decoder-layers`` blocks and the
largest layer (the vocabulary projection, which sets the memory peak), SVD at a quarter of
their rank, and copies every other tensor through, so it reads and writes the whole model;
its per-layer time extrapolates to all layers. ``--spectra-layers N`` limits the spectra
phase to the first N layers and the largest (default: all).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, vocab_size=4000),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                 vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32000),
}
HERE = os.path.abspath(__file__)


def _config(size: str, blocks: int | None = None):
    from transformers import LlamaConfig

    spec = dict(SIZES[size])
    if blocks:
        spec["num_hidden_layers"] = blocks
    return LlamaConfig(num_key_value_heads=spec["num_attention_heads"], tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], **spec)


def full_size_mb(size: str) -> float:
    """The float32 size of the model with all its blocks (meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(_config(size))
    return sum(p.numel() for p in meta.parameters()) * 4 / 2**20


def make_model(folder: str, size: str, blocks: int | None = None, shard_bytes: int = 1 << 30,
               seed: int = 0) -> dict:
    """Write the synthetic model tensor by tensor (one tensor in memory): shards, index, config."""
    from transformers import AutoModelForCausalLM

    from tensorscope.sources import INDEX_NAME
    from tensorscope.streaming import ShardWriter

    if os.path.isfile(os.path.join(folder, INDEX_NAME)):
        return json.load(open(os.path.join(folder, INDEX_NAME)))
    os.makedirs(folder, exist_ok=True)
    cfg = _config(size, blocks)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    entries = [(k, torch.float32, tuple(v.shape)) for k, v in meta.state_dict().items()]
    groups, size_now = [[]], 0
    for e in entries:
        nbytes = 4 * int(torch.Size(e[2]).numel())
        if groups[-1] and size_now + nbytes > shard_bytes:
            groups.append([])
            size_now = 0
        groups[-1].append(e)
        size_now += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(os.path.join(folder, name), group)
        for key, _, shape in group:
            if len(shape) == 1:
                t = torch.ones(shape)
            else:  # random, with decaying column scales: a spectrum that decays like a trained layer's
                t = torch.randn(shape, generator=g) * 0.02
                t *= (torch.arange(shape[1], dtype=torch.float32) + 1.0).pow(-0.5) * shape[1] ** 0.25
            w.write(key, t)
            weight_map[key] = name
            total += t.numel() * 4
            del t
        w.close()
    cfg.save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f)
    return index


# ---- one phase, in a child process ---------------------------------------------------------


def _peak_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` would also count the
    parent's memory that the fork copied before the exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(phase: str, folder: str, out: str, decoder_layers: int, spectra_layers: int | None) -> None:
    torch.set_num_threads(1)
    import tensorscope as ts
    from tensorscope import distributed, streaming

    rank = int(os.environ.get("RANK", "0"))
    result = {"phase": phase, "rank": rank}
    from tensorscope.sources import open_source

    source = open_source(folder)
    infos = ts.inspect(source)
    names = [i.name for i in infos]
    largest = max(infos, key=lambda i: i.params).name  # the vocabulary projection: the memory peak
    result["idle_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    if phase == "spectra":
        asked = names if not spectra_layers else list(dict.fromkeys(names[:spectra_layers] + [largest]))
        ts.spectra(source, layers=asked)
        result.update(wall_s=time.perf_counter() - t0, layers=len(asked))
    elif phase == "compress":
        planned = [n for n in names if n.startswith("model.layers.")
                   and int(n.split(".")[2]) < decoder_layers] + [largest]
        plan = {n: {"method": "svd", "rank": 0.25} for n in planned}
        times = {"factorize": 0.0, "copy": 0.0, "layers": 0, "tensors": 0}
        real = streaming._do_item

        def timed(run, it, *a, **k):
            t = time.perf_counter()
            real(run, it, *a, **k)
            kind = "factorize" if it.resolved is not None else "copy"
            times[kind] += time.perf_counter() - t
            times["layers" if it.resolved is not None else "tensors"] += 1

        streaming._do_item = timed
        distributed.context()
        t0 = time.perf_counter()
        ts.compress(source, plan, out=out, shard_bytes=256 << 20)
        result.update(wall_s=time.perf_counter() - t0, factorize_s=times["factorize"], copy_s=times["copy"],
                      layers=times["layers"], tensors=times["tensors"], planned=len(planned))
    result["peak_rss_mb"] = _peak_mb()
    print("BENCH " + json.dumps(result), flush=True)


def run_child(phase: str, args, nproc: int = 1) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    tail = [HERE, "--child", phase, "--folder", args.folder, "--out", args.out,
            "--decoder-layers", str(args.decoder_layers), "--spectra-layers", str(args.spectra_layers or 0)]
    if nproc > 1:
        cmd = ["nice", "-n", "5", sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), *tail]
    else:
        cmd = ["nice", "-n", "5", sys.executable, *tail]
    if phase == "compress":
        shutil.rmtree(args.out, ignore_errors=True)
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampled: dict[int, float] = {}

    def sample():
        while proc.poll() is None:
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    with_rss = p.memory_info().rss / 2**20
                    sampled[p.pid] = max(sampled.get(p.pid, 0.0), with_rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    text = proc.stdout.read()
    proc.wait()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{phase} with {nproc} process(es) failed:\n{text[-4000:]}")
    rows = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("BENCH ")]
    for r in rows:
        r["sampled_max_rss_mb"] = max(sampled.values()) if sampled else None
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--folder", help="where the synthetic model is (written once); default: a temp folder")
    ap.add_argument("--out", help="the compressed folder (default: beside --folder)")
    ap.add_argument("--decoder-layers", type=int, default=3, help="blocks whose layers the compress phase factorizes")
    ap.add_argument("--spectra-layers", type=int, default=0, help="layers the spectra phase measures (0: all)")
    ap.add_argument("--blocks", type=int, help="write only this many decoder blocks (memory is per layer: the "
                    "peak over the full model's size is then reported too)")
    ap.add_argument("--phases", default="spectra,compress1,compress2",
                    help="comma-separated: spectra, compress1 (one process), compress2 (torchrun, 2 processes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--keep-files", action="store_true", help="keep the synthetic model and the output")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.folder, args.out, args.decoder_layers, args.spectra_layers or None)
        return
    tmp = None
    if args.folder is None:
        tmp = tempfile.mkdtemp(prefix="ts-large-")
        args.folder = os.path.join(tmp, f"llama-{args.size}" + (f"-{args.blocks}blocks" if args.blocks else ""))
    args.out = args.out or args.folder.rstrip("/") + "-compressed"
    t = time.perf_counter()
    index = make_model(args.folder, args.size, args.blocks)
    model_mb = index["metadata"]["total_size"] / 2**20
    full_mb = full_size_mb(args.size)
    print(f"model: Llama shapes '{args.size}'" + (f", {args.blocks} of its blocks" if args.blocks else "")
          + f", {model_mb / 1024:.2f} GiB float32 in {len(set(index['weight_map'].values()))} shards "
          f"({time.perf_counter() - t:.0f} s to write/find); the whole model is {full_mb / 1024:.2f} GiB")
    phases = args.phases.split(",")
    load = os.getloadavg()[0]
    res = {"model_mb": model_mb, "full_mb": full_mb, "idle": run_child("idle", args)[0]}
    if "spectra" in phases:
        res["spectra"] = run_child("spectra", args)[0]
    if "compress1" in phases:
        res["compress_1"] = run_child("compress", args)[0]
    if "compress2" in phases:
        res["compress_2"] = run_child("compress", args, nproc=2)
    idle = res["idle"]

    def ratios(mb):
        text = f"{mb / model_mb:.3f}"
        return text + (f" ({mb / full_mb:.3f} of the whole model)" if args.blocks else "")

    rows = [["open + inspect (the fixed cost)", 1, f"{idle['peak_rss_mb']:.0f}", ratios(idle["peak_rss_mb"]), "-", "-"]]
    if "spectra" in res:
        sp = res["spectra"]
        rows.append([f"spectra, {sp['layers']} layers", 1, f"{sp['peak_rss_mb']:.0f}", ratios(sp["peak_rss_mb"]),
                     f"{sp['wall_s']:.0f}", f"{sp['wall_s'] / sp['layers']:.2f}"])
    if "compress_1" in res:
        one = res["compress_1"]
        rows.append([f"compress: {one['layers']} layers factorized, {one['tensors']} tensors copied", 1,
                     f"{one['peak_rss_mb']:.0f}", ratios(one["peak_rss_mb"]), f"{one['wall_s']:.0f}",
                     f"{one['factorize_s'] / max(one['layers'], 1):.2f}"])
    if "compress_2" in res:
        two = res["compress_2"]
        peak2, wall2 = max(r["peak_rss_mb"] for r in two), max(r["wall_s"] for r in two)
        fac2 = max(r["factorize_s"] for r in two)
        rows.append(["compress, the same, torchrun", 2, f"{peak2:.0f} (max)", ratios(peak2), f"{wall2:.0f}",
                     f"{fac2 / max(sum(r['layers'] for r in two), 1):.2f} (wall)"])
    print(f"\nload average at start {load:.1f} on {os.cpu_count()} cores; one thread per process\n")
    print("| phase | processes | peak RSS (MB) | peak / model size | wall (s) | s per layer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    for key, label in (("spectra", "spectra"), ("compress_1", "compress")):
        if key in res:
            print(f"{label}: peak minus the fixed cost {res[key]['peak_rss_mb'] - idle['peak_rss_mb']:.0f} MB "
                  f"= {(res[key]['peak_rss_mb'] - idle['peak_rss_mb']) / model_mb:.3f} of this model")
    if "compress_1" in res and "compress_2" in res:
        one, two = res["compress_1"], res["compress_2"]
        per = ", ".join(f"{r['factorize_s']:.1f} s ({r['layers']} layers)" for r in two)
        print(f"factorization phase, 2 processes over 1: {one['factorize_s'] / fac2:.2f}x (1 process "
              f"{one['factorize_s']:.1f} s; 2 processes {per}); whole compress run {one['wall_s'] / wall2:.2f}x")
    print(json.dumps(res))
    if tmp and not args.keep_files:
        shutil.rmtree(tmp, ignore_errors=True)
    elif not args.keep_files:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
