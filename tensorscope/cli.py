"""``tensorscope``: inspect, plan, compress and export from the shell (scripts and CI).

    tensorscope examples
    tensorscope methods
    tensorscope inspect lenet5
    tensorscope spectra model.safetensors --arch mypkg.nets:resnet --plot spectra.png
    tensorscope compress lenet5 --keep 0.25 [--by flops] [--data calib.pt --finetune 200] -o small.pt
    tensorscope compress model.pt --arch mypkg.nets:resnet --plan plan.json -o small.pt
    tensorscope compress lenet5 --iterative 3 --rank-rule weakened_vbmf -o small.pt
    tensorscope train lenet5 --tau 0.03 --epochs 3 [-o small.pt]
    tensorscope export small.pt -o small.pt2 --input-shape 1,28,28
    tensorscope serve
    tensorscope spectra llama-7b/                                  # weights on disk, a layer at a time
    torchrun --nproc-per-node 2 -m tensorscope compress llama-7b/ --keep 0.5 -o llama-7b-half/

MODEL is a built-in example's name, a tensorscope checkpoint, a state dict (``.pt``,
``.safetensors``) with ``--arch package.module:factory``, a Hugging Face folder, or a pickled
module with ``--trust``. A folder of safetensors shards (or a ``.safetensors`` file given
without ``--arch``) is streamed from disk by ``inspect``, ``spectra`` and ``compress`` (which
then writes a folder), unless an option needs the network in memory (``--data``, ``--eval``,
``--finetune``, ...). Every error from bad input is one line on stderr and exit status 2;
nothing is written half-way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from . import __version__
from .errors import TensorscopeError
from .units import format_count, parse_shape, text_table

EXIT_BAD_INPUT = 2


class _Loaded:
    """A model with what is known about its inputs: a name, a sample input, data."""

    def __init__(self, model: nn.Module, name: str, example_input: Any = None, test: Any = None,
                 calibration: Any = None):
        self.model, self.name = model, name
        self.example_input, self.test, self.calibration = example_input, test, calibration


def _load(args: argparse.Namespace) -> _Loaded:
    from . import examples
    from .checkpoint import load_model
    from .sources import is_compressed_folder

    spec = args.model
    text = getattr(args, "input_shape", None)
    shape = parse_shape(text, "--input-shape") if text else None  # checked before any loading
    if spec in examples.list_examples() and not os.path.exists(spec):
        ex = examples.load_example(spec, progress=not args.quiet)
        return _Loaded(ex.model, spec, ex.example_input(1), ex.test_loader(), ex.calibration())
    kwargs = json.loads(args.arch_kwargs) if getattr(args, "arch_kwargs", None) else None
    if is_compressed_folder(spec):  # what `compress WEIGHTS -o FOLDER` wrote
        from .checkpoint import load

        model = load(spec, arch=args.arch, arch_kwargs=kwargs, trust=args.trust)
    else:
        model = load_model(spec, arch=args.arch, arch_kwargs=kwargs, trust=args.trust)
    if shape is None:  # a built-in example's architecture knows its input
        from ._arch import get_arch

        ref = str((get_arch(model) or {}).get("ref", ""))
        name = ref.partition("tensorscope.examples:")[2]
        if ref.startswith("tensorscope.examples:") and name in examples.list_examples():
            shape = examples.example_info(name).input_shape
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)) if shape else None
    return _Loaded(model, os.path.basename(os.path.normpath(spec)), x)


# ---- weights on disk: read a layer at a time (large models; torchrun for compress) ---------

#: options that need the network in memory (they run data through it)
_IN_MEMORY = (("data", "--data"), ("eval", "--eval"), ("finetune", "--finetune"), ("fold_bn", "--fold-bn"),
              ("iterative", "--iterative"), ("input_shape", "--input-shape"))


def _on_disk(args: argparse.Namespace) -> Any:
    """A :class:`~tensorscope.sources.WeightSource` when MODEL is weights to stream (a folder of
    safetensors shards, or a .safetensors file given without --arch) and no option needs the
    network in memory; None otherwise (the model is then loaded whole, as before)."""
    from .sources import is_weights_path, open_source

    spec = args.model
    if not os.path.exists(spec) or not is_weights_path(spec) or (os.path.isfile(spec) and args.arch):
        return None
    if any(getattr(args, attr, None) for attr, _ in _IN_MEMORY) or getattr(args, "by", "params") == "flops":
        return None
    kwargs = json.loads(args.arch_kwargs) if getattr(args, "arch_kwargs", None) else None
    return open_source(spec, arch=args.arch, arch_kwargs=kwargs)


def _compress_on_disk(args: argparse.Namespace, source: Any) -> int:
    """``compress`` of weights on disk into the folder -o, a layer at a time; under torchrun the
    layers are shared among the processes (process 0 plans, prints and writes the index)."""
    from . import distributed
    from .budget import plan_for_budget
    from .plan import Plan
    from .sources import open_source
    from .surgery import compress

    ctx = distributed.context()
    plan, error = None, None
    if args.plan is not None:
        plan = Plan.load(args.plan)
    elif ctx.is_main:  # one process plans from the spectra; the others wait for its plan
        try:
            methods = args.methods if args.methods == "auto" else args.methods.split(",")
            plan = plan_for_budget(source, args.keep, methods=methods, progress=not args.quiet)
        except Exception as e:  # shared below, so that no process waits for a plan that will not come
            if not ctx.distributed:
                raise
            error = str(e) if isinstance(e, TensorscopeError) else f"{type(e).__name__}: {e}"
    shared = ctx.gather((plan.to_dict() if plan is not None else None, error), "planning")[0]
    if shared[1]:
        raise TensorscopeError(shared[1])
    plan = Plan.from_dict(shared[0])
    out = compress(source, plan, out=args.output, progress=not args.quiet)
    if ctx.is_main:
        params = open_source(out).metadata["tensorscope"]["params"]
        before, after = params["before"], params["after"]
        procs = f" with {ctx.world} processes" if ctx.distributed else ""
        print(f"{os.path.basename(os.path.normpath(args.model))}: {_fmt(before)} -> {_fmt(after)} params "
              f"({before / after:.2f}x smaller), {len(plan)} layers decomposed{procs}; wrote {out}")
        if args.plan_out:
            plan.save(args.plan_out)
            print(f"wrote {args.plan_out}")
    return 0


def _data(path: str | None, batch_size: int) -> list | None:
    if not path:
        return None
    from .data import load_data_file

    return load_data_file(path, batch_size=batch_size)


def _first_input(data: list | None) -> Any:
    if not data:
        return None
    from .data import split_batch

    b = split_batch(data[0])
    return b.args[0][:1] if len(b.args) == 1 and not b.kwargs else data[0]


def _fmt(n: float | int | None, unit: str = "") -> str:
    return format_count(n, unit)


def _rank_text(rank: Any) -> str:
    return "x".join(map(str, rank)) if isinstance(rank, (tuple, list)) else str(rank)


# ---- commands -----------------------------------------------------------------------------


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available_group_methods, available_methods, get_group_method, get_method

    rows = []
    for n in available_methods():
        d = get_method(n).describe()
        flags = [f for f, on in (("budget", d["error_curve"]), ("data-aware", d["uses_data"]), ("slow", d["slow"])) if on]
        rows.append([n, ", ".join(d["kinds"]), ", ".join(d["options"]) or "-", ", ".join(flags) or "-", d["description"]])
    for n in available_group_methods():  # under a plan's "groups": several layers together
        d = get_group_method(n).describe()
        flags = ["group"] + (["budget"] if d["error_curve"] else [])
        rows.append([n, ", ".join(d["kinds"]), ", ".join(d["options"]) or "-", ", ".join(flags), d["description"]])
    print(text_table(rows, ["method", "layers", "options", "traits", "what it builds"], "lllll"))
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from . import examples

    rows = [[n, examples.example_info(n).description] for n in examples.list_examples()]
    print(text_table(rows, ["name", "network"], "ll"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inventory import count_flops, count_params, inspect

    source = _on_disk(args)  # weights on disk: only the headers are read
    loaded = _Loaded(source.skeleton(), os.path.basename(os.path.normpath(args.model))) if source else _load(args)
    infos = inspect(source if source is not None else loaded.model, loaded.example_input, include_skipped=True)
    if args.json:
        out = [{"name": i.name, "kind": i.kind, "weight_shape": list(i.weight_shape), "params": i.params,
                "flops": i.flops, "max_rank": {k: (list(v) if isinstance(v, tuple) else v) for k, v in i.max_rank.items()},
                "reason": i.reason} for i in list(infos) + infos.skipped]
        print(json.dumps(out, indent=2))
        return 0
    print(f"{loaded.name}: {_fmt(count_params(loaded.model))} params"
          + (f", {_fmt(count_flops(loaded.model, loaded.example_input), 'FLOPs')} per sample"
             if loaded.example_input is not None else " (FLOPs: pass --input-shape)"))
    print(infos)
    return 0


def cmd_spectra(args: argparse.Namespace) -> int:
    from .spectra import spectra

    source = _on_disk(args)  # weights on disk: one layer in memory at a time
    loaded = _Loaded(source.skeleton(), os.path.basename(os.path.normpath(args.model))) if source else _load(args)
    data = _data(args.data, args.batch_size)
    specs = spectra(source if source is not None else loaded.model, unfolding=args.unfolding, data=data,
                    progress=not args.quiet)
    rows = []
    for name, s in specs.items():
        m = s.metrics()
        rows.append([name, str(m["max_rank"]), f"{m['spectral_norm']:.4g}", f"{m['stable_rank']:.1f}",
                     f"{m['effective_rank']:.1f}", "-" if math.isnan(m["alpha"]) else f"{m['alpha']:.2f}",
                     str(s.rank_for_energy(0.9)), str(s.rank_for_energy(0.99))])
    if args.json:
        print(json.dumps({n: {**s.metrics(), "values": s.values.tolist()} for n, s in specs.items()}, indent=2))
    else:
        kind = "whitened by the data's input statistics" if data is not None else "of the weights"
        print(f"{loaded.name}: singular values ({args.unfolding} unfolding) {kind}")
        print(text_table(rows, ["layer", "max rank", "spectral norm", "stable rank", "effective rank", "alpha",
                            "rank 90%", "rank 99%"]))
    if args.plot:
        _plot_spectra(specs, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot_spectra(specs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ._io import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in specs.items():
        v = s.values.astype(np.float64)
        if not v.size or v[0] <= 0:
            continue
        x = np.arange(1, v.size + 1) / v.size
        ax1.semilogy(x, np.maximum(v / v[0], 1e-12), label=name, lw=1.2)
        ax2.plot(x, s.energy, lw=1.2)
    ax1.set(xlabel="rank / max rank", ylabel="s_i / s_1", title="normalised singular values")
    ax2.set(xlabel="rank / max rank", ylabel="energy kept", title="cumulative energy", ylim=(0, 1.01))
    if len(specs) <= 16:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def cmd_compress(args: argparse.Namespace) -> int:
    from .budget import plan_for_budget
    from .checkpoint import save
    from .evaluate import evaluate
    from .inventory import count_params
    from .plan import Plan
    from .surgery import compress

    if args.iterative is not None:
        _check_iterative_args(args)
    elif (args.plan is None) == (args.keep is None):
        raise TensorscopeError("give exactly one of --plan plan.json or --keep FRACTION")
    if args.finetune and args.finetune < 0:
        raise TensorscopeError(f"--finetune takes a number of steps >= 0; got {args.finetune}")
    source = _on_disk(args)
    if source is not None:
        return _compress_on_disk(args, source)
    loaded = _load(args)
    model = loaded.model
    data = _data(args.data, args.batch_size)
    evaluation = _data(args.eval, args.batch_size) or loaded.test
    example = loaded.example_input if loaded.example_input is not None else _first_input(data)
    if args.iterative is not None:
        small, plan = _compress_iterative(args, loaded, data)
    else:
        methods = args.methods if args.methods == "auto" else args.methods.split(",")
        stats = None
        if args.allocation == "output" and data is None:
            raise TensorscopeError("--allocation output estimates what the network's output loses: pass --data FILE")
        if args.correct and data is None:
            raise TensorscopeError("--correct refits layers on the compressed network's inputs: pass --data FILE")
        if args.plan is not None:
            plan = Plan.load(args.plan)
            plan.validate(model)  # every error before any work
        else:
            if data is not None and not args.fold_bn:  # one pass of statistics for the plan and the factors
                from .budget import plannable_layers
                from .calibration import collect_stats

                stats = collect_stats(model, data, plannable_layers(model, methods, args.by, example),
                                      gradients=args.allocation == "output", progress=not args.quiet)
            plan = plan_for_budget(model, args.keep, by=args.by, methods=methods, data=data,
                                   stats=stats, example_input=example, allocation=args.allocation,
                                   progress=not args.quiet)
        if stats is not None:
            small = compress(model, plan, stats=stats, progress=not args.quiet)
            if args.correct:
                from .correction import correct

                small = correct(small, model, data, stats=stats, dense=args.correct == "dense", progress=not args.quiet)
        else:
            small = compress(model, plan, data=data, fold_bn=args.fold_bn, correct=args.correct,
                             example_input=example, progress=not args.quiet)
    if args.finetune and args.iterative is None:
        from .recovery import finetune

        if data is None:
            raise TensorscopeError("--finetune needs training data: pass --data FILE (labels optional)")
        small = finetune(small, data, teacher=model, steps=args.finetune, progress=not args.quiet)
    save(small, args.output, plan=plan)
    before, after = count_params(model), count_params(small)
    print(f"{loaded.name}: {_fmt(before)} -> {_fmt(after)} params ({before / after:.2f}x smaller), "
          f"{len(plan)} layers decomposed; wrote {args.output}")
    if args.plan_out:
        plan.save(args.plan_out)
        print(f"wrote {args.plan_out}")
    if evaluation is not None:
        q1 = evaluate(small, evaluation, reference=model)
        if "accuracy" in q1:
            q0 = evaluate(model, evaluation)
            print(f"accuracy {q0['accuracy']:.2%} -> {q1['accuracy']:.2%}; agreement with the original "
                  f"{q1['agreement']:.2%}")
        elif "agreement" in q1:
            print(f"agreement with the original {q1['agreement']:.2%}, relative output error "
                  f"{q1['relative_error']:.4f}")
    return 0


def _as_tensorscope_error(e: ValueError) -> TensorscopeError:
    """A library ValueError (a bad tau, weakening, ...) as the CLI's one-line bad-input error."""
    return e if isinstance(e, TensorscopeError) else TensorscopeError(str(e))


def _check_iterative_args(args: argparse.Namespace) -> None:
    """Every error of ``compress --iterative``'s options, before anything is loaded."""
    if args.plan is not None:
        raise TensorscopeError("--iterative chooses each stage's ranks itself; drop --plan")
    if args.iterative < 1:
        raise TensorscopeError(f"--iterative takes a number of stages >= 1; got {args.iterative}")
    if args.rank_rule == "budget" and args.keep is None:
        raise TensorscopeError("--iterative with --rank-rule budget needs --keep FRACTION")
    if args.rank_rule != "budget" and args.keep is not None:
        raise TensorscopeError(f"--keep is a budget's target; --rank-rule {args.rank_rule} sets each layer's rank "
                               "itself (drop --keep)")
    if args.by != "params":
        raise TensorscopeError("--iterative budgets parameters only (drop --by flops)")
    if args.fold_bn:
        raise TensorscopeError("--fold-bn is not supported with --iterative")
    if not (math.isfinite(args.weakening) and 0.0 <= args.weakening <= 1.0):
        raise TensorscopeError(f"--weakening must be in [0, 1]; got {args.weakening}")


def _compress_iterative(args: argparse.Namespace, loaded: _Loaded, data: list | None) -> tuple[nn.Module, Any]:
    """``compress --iterative N``: :func:`tensorscope.iterative`, with a table of its stages."""
    from .plan import Plan
    from .recovery import iterative
    from .surgery import plan_of

    data = data if data is not None else loaded.calibration
    if data is None:
        raise TensorscopeError("--iterative fine-tunes after every stage: pass --data FILE (labels optional)")
    try:
        small, history = iterative(
            loaded.model, data, keep=args.keep, steps=args.iterative,
            finetune_steps=100 if args.finetune is None else args.finetune,
            methods=args.methods if args.methods == "auto" else args.methods.split(","),
            rank_rule=args.rank_rule, weakening=args.weakening,
            layers=args.layers.split(",") if args.layers else None, layers_per_stage=args.layers_per_stage,
            recompress=args.recompress, progress=not args.quiet)
    except ValueError as e:
        raise _as_tensorscope_error(e) from None
    key = "accuracy" if "accuracy" in history.meta["original"] else "agreement"
    rows = [[str(s.stage), _fmt(s.params), f"{s.keep:.1%}", f"{s.before[key]:.2%}", f"{s.after[key]:.2%}",
             ", ".join(s.changed)] for s in history]
    print(text_table(rows, ["stage", "params", "kept", f"{key} before", f"{key} after", "layers changed"],
                     "rrrrrl"))
    if history.stopped:
        print(f"stopped: {history.stopped}")
    return small, plan_of(small) or Plan()


def cmd_train(args: argparse.Namespace) -> int:
    from . import examples
    from .checkpoint import save
    from .evaluate import evaluate
    from .inventory import count_params
    from .lowrank import lowrank_train
    from .rules import plan_by_rule
    from .surgery import compress

    # every bad number before anything is loaded or trained
    if not (math.isfinite(args.tau) and args.tau >= 0):
        raise TensorscopeError(f"--tau must be a finite number >= 0; got {args.tau}")
    if args.epochs < 1 or args.prox_every < 1:
        raise TensorscopeError(f"--epochs and --prox-every must be >= 1; got {args.epochs} and {args.prox_every}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise TensorscopeError(f"--lr must be a positive number; got {args.lr}")
    if not 0.0 < args.energy <= 1.0:
        raise TensorscopeError(f"--energy must be in (0, 1]; got {args.energy}")
    loaded = _load(args)
    data = _data(args.data, args.batch_size)
    if data is None:
        if args.model not in examples.list_examples() or os.path.exists(args.model):
            raise TensorscopeError("--data FILE (inputs and labels) is needed to train a network that is not a "
                                   "built-in example")
        data = examples.load_example(args.model).train_loader(batch_size=args.batch_size, shuffle=True)
    evaluation = _data(args.eval, args.batch_size) or loaded.test
    methods = args.methods if args.methods == "auto" else args.methods.split(",")
    try:
        trained, history = lowrank_train(
            loaded.model, data, tau=args.tau, layers=args.layers.split(",") if args.layers else None,
            prox_every=args.prox_every, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
            val_data=evaluation, energy=args.energy, progress=not args.quiet)
        names = history.meta["layers"]
        plan = plan_by_rule(trained, "energy", keep=args.energy, methods=methods, layers=names)
    except ValueError as e:
        raise _as_tensorscope_error(e) from None
    small = compress(trained, plan)
    rows = [[str(r.epoch), "" if r.loss is None else f"{r.loss:.4f}",
             f"{r.val['accuracy']:.2%}" if "accuracy" in r.val else "",
             *[str(r.info["energy_rank"][n]) for n in names]] for r in history]
    print(text_table(rows, ["epoch", "loss", "val accuracy", *[f"{n} rank@{args.energy:g}" for n in names]]))
    before, after = count_params(trained), count_params(small)
    print(f"{loaded.name}: trained with tau={args.tau:g}; {args.energy:.0%}-energy ranks: {_fmt(before)} -> "
          f"{_fmt(after)} params ({before / after:.2f}x smaller), {len(plan)} layers decomposed")
    if evaluation is not None:
        q0, q1 = evaluate(trained, evaluation), evaluate(small, evaluation, reference=trained)
        if "accuracy" in q1:
            print(f"accuracy trained {q0['accuracy']:.2%} -> truncated {q1['accuracy']:.2%}")
    if args.output:
        save(small, args.output, plan=plan)
        print(f"wrote {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export

    loaded = _load(args)
    example = loaded.example_input if loaded.example_input is not None else _first_input(_data(args.data, 1))
    if example is None:
        raise TensorscopeError("export needs the shape of one input: pass --input-shape 1,28,28 (or --data FILE)")
    path = export(loaded.model, args.output, example, format=args.format)
    print(f"wrote {path} ({args.format}; loads with torch alone)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    app = Path(__file__).resolve().parent.parent / "apps" / "explorer.py"
    if not app.exists():
        raise TensorscopeError(f"the explorer app is not at {app}: run from a checkout of tensorscope "
                               "(pip install -e '.[app]')")
    cmd = [sys.executable, "-m", "panel", "serve", str(app), "--port", str(args.port),
           "--websocket-max-message-size", str(100 * 1024 * 1024)]
    if args.show:
        cmd.append("--show")
    env = dict(os.environ)
    if args.example:
        env["TENSORSCOPE_EXPLORER_EXAMPLE"] = args.example
    return subprocess.call(cmd, env=env)


# ---- entry point --------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser, shape: bool = True) -> None:
    p.add_argument("model", help="a built-in example's name, or a checkpoint / state dict / Hugging Face folder")
    p.add_argument("--arch", help="package.module:factory building the network a state dict belongs to")
    p.add_argument("--arch-kwargs", help="JSON keyword arguments for --arch")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a whole module (runs code from the file: only files you trust)")
    if shape:
        p.add_argument("--input-shape", help="one sample's shape, e.g. 1,28,28 (for FLOPs and export)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="tensorscope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tensorscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("examples", help="list the built-in example networks")
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser("methods", help="list the decomposition methods, plugins included")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("inspect", help="the decomposable layers: shapes, params, FLOPs, max ranks")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("spectra", help="singular-value metrics per layer (and a PNG with --plot)")
    _model_args(p)
    p.add_argument("--unfolding", choices=["out", "in"], default="out")
    p.add_argument("--data", help="a .pt/.npz of inputs: show the whitened spectra truncation actually cuts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--plot", metavar="PNG", help="write the spectra as a PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_spectra)

    p = sub.add_parser("compress", help="apply a plan (or a whole-model budget) and save a checkpoint")
    _model_args(p)
    p.add_argument("--plan", help="a plan JSON file")
    p.add_argument("--keep", type=float, help="keep this fraction of the parameters (or FLOPs with --by flops)")
    p.add_argument("--by", choices=["params", "flops"], default="params")
    p.add_argument("--methods", default="auto",
                   help="methods the budget planner may use, comma-separated (default: all with a cheap error curve)")
    p.add_argument("--data", help="calibration data (.pt/.npz): data-aware factors and budget")
    p.add_argument("--allocation", choices=["layer", "output"], default="layer",
                   help="with --keep and --data: minimise the layers' own errors (layer) or the estimated loss "
                        "of the network's output (output: Fisher/K-FAC, held out; see tensorscope.allocation)")
    p.add_argument("--correct", nargs="?", const=True, default=False, choices=[True, "dense"], metavar="dense",
                   help="with --data: refit each compressed layer to the compressed network's own inputs; "
                        "--correct dense: the layers left dense after the first compressed one too")
    p.add_argument("--eval", help="evaluation data (.pt/.npz); default: a built-in example's test split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--finetune", type=int, default=None, metavar="STEPS",
                   help="recovery steps (distillation) on --data (with --iterative: per stage, default 100)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the conv before it first")
    p.add_argument("-o", "--output", required=True,
                   help="the checkpoint to write (ts.load reads it); for weights on disk, a folder of shards")
    p.add_argument("--plan-out", help="also write the plan as JSON")
    p.add_argument("--iterative", type=int, metavar="N",
                   help="compress in N stages, fine-tuning after each (MUSCO); data: --data or the example's")
    p.add_argument("--rank-rule", choices=["budget", "weakened_vbmf"], default="budget",
                   help="with --iterative: ranks from the budget (--keep) or MUSCO's weakened VBMF")
    p.add_argument("--weakening", type=float, default=0.8, help="with --rank-rule weakened_vbmf: in [0, 1]")
    p.add_argument("--layers-per-stage", type=int, help="with --rank-rule weakened_vbmf: layers per stage")
    p.add_argument("--recompress", choices=["dense", "core"], default="dense",
                   help="with --iterative: decompose again from the rebuilt weight, or the Tucker-2 core only")
    p.add_argument("--layers", help="with --iterative: only these layers, comma-separated")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("train", help="train toward low rank (nuclear-norm proximal SGD), then truncate")
    _model_args(p)
    p.add_argument("--tau", type=float, required=True, help="the penalty's weight (0: plain SGD)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--prox-every", type=int, default=1, help="steps between proximal steps")
    p.add_argument("--layers", help="the layers to regularise, comma-separated (default: all decomposable)")
    p.add_argument("--energy", type=float, default=0.99, help="truncate each layer at this energy (default 0.99)")
    p.add_argument("--methods", default="svd", help="methods for the truncation, comma-separated (default svd)")
    p.add_argument("--data", help="training data (.pt/.npz, with labels); default: a built-in example's")
    p.add_argument("--eval", help="evaluation data (.pt/.npz); default: a built-in example's test split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-o", "--output", help="write the truncated model as a checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a file torch alone runs (torch.export, TorchScript or ONNX)")
    _model_args(p)
    p.add_argument("--format", default="exported_program", choices=["exported_program", "torchscript", "onnx"])
    p.add_argument("--data", help="a .pt/.npz whose first sample gives the input shape")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="start the explorer (panel serve apps/explorer.py)")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--example", help="the built-in example the page opens on")
    p.add_argument("--show", action="store_true", help="open a browser")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            return int(args.func(args) or 0)
    except (TensorscopeError, FileNotFoundError, IsADirectoryError, PermissionError,
            json.JSONDecodeError) as e:
        if args.traceback:
            raise
        print(f"tensorscope {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to `head` or similar, which stopped reading
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
