"""Hostile inputs: one table of bad files, plans, architectures and data, each refused cleanly.

Every row of :data:`CASES` builds one bad input in ``tmp_path`` (nothing binary is committed),
feeds it to one library entry point and, where natural, to the CLI, and checks:

* the exception class (a :class:`tensorscope.TensorscopeError` subclass, or
  ``FileNotFoundError`` for a missing path) and a fragment its message must contain, so the
  message says what was wrong;
* the CLI exits with status 2 and writes exactly one line on stderr;
* nothing was written half-way: ``tmp_path`` holds exactly the inputs (no temporary file, no
  marker a pickle payload would have created, no ``-o`` output);
* the process keeps working: a good checkpoint still loads bit for bit and a good plan still
  compresses, and the peak memory did not balloon (refusals happen before allocating).

Then hypothesis fuzzes ``Plan.from_json`` / ``Plan.from_dict`` / ``Plan.validate`` (only
``PlanError`` may escape) and ``ts.compress`` over random small Linear/Conv2d layers and
ranks (a model that is exact at full rank and whose size ``ts.plan_cost`` predicts, or a
tensorscope error; never another exception, never NaN).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import archs  # noqa: E402

import tensorscope as ts  # noqa: E402
from tensorscope.checkpoint import NonFiniteWarning  # noqa: E402
from tensorscope.cli import EXIT_BAD_INPUT, main  # noqa: E402
from tensorscope.data import load_data_file  # noqa: E402
from tensorscope.errors import (  # noqa: E402
    ArchitectureError,
    CheckpointError,
    DataError,
    FileTooLargeError,
    NonFiniteWeightError,
    PlanError,
    RankError,
    TensorscopeError,
    UntrustedFileError,
)

ARCH = "archs:SmallCNN"
GOOD_PLAN = {"down": {"method": "svd", "rank": 4}, "head": {"method": "svd", "rank": 5}}
#: a refusal may not raise the process's peak memory by more than this (the bombs declare GBs)
MAX_PEAK_GROWTH = 512 << 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: spin-waiting BLAS threads only hurt
    yield
    torch.set_num_threads(saved)


@dataclass
class Shared:
    """Good inputs built once per module, outside every case's ``tmp_path``."""

    dir: Path
    model: nn.Module  # archs.small_cnn(): the architecture every weights file belongs to
    x: torch.Tensor
    ckpt: Path  # a tensorscope checkpoint of a compressed small_cnn (plan + arch recorded)
    ckpt_out: torch.Tensor  # its output on x
    plain: Path  # a tensorscope checkpoint of the uncompressed small_cnn
    sd_pt: Path  # torch.save(state_dict)
    plan_file: Path  # a valid plan for small_cnn


@pytest.fixture(scope="module")
def sh(tmp_path_factory) -> Shared:
    folder = tmp_path_factory.mktemp("hostile_shared")
    model = archs.small_cnn()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = ts.compress(model, GOOD_PLAN).eval()
    ts.save(small, folder / "good.pt")
    ts.save(model, folder / "plain.pt")
    torch.save(model.state_dict(), folder / "sd.pt")
    ts.Plan(GOOD_PLAN).save(folder / "plan.json")
    with torch.no_grad():
        out = small(x)
    return Shared(folder, model, x, folder / "good.pt", out, folder / "plain.pt", folder / "sd.pt",
                  folder / "plan.json")


# ---- builders: each returns a function (tmp_path, shared) -> the path (or reference) to feed ----


def raw(name: str, data: bytes | Callable[[Shared], bytes]) -> Callable:
    def build(tmp: Path, s: Shared) -> Path:
        p = tmp / name
        p.write_bytes(data(s) if callable(data) else data)
        return p

    return build


def tsave(name: str, obj: Callable[[Shared, Path], Any], **kw) -> Callable:
    def build(tmp: Path, s: Shared) -> Path:
        p = tmp / name
        torch.save(obj(s, tmp), p, **kw)
        return p

    return build


def st_save(name: str, tensors: Callable[[Shared], dict]) -> Callable:
    from safetensors.torch import save_file

    def build(tmp: Path, s: Shared) -> Path:
        p = tmp / name
        save_file({k: v.contiguous() for k, v in tensors(s).items()}, str(p))
        return p

    return build


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def header(name: str, mutate: Callable[[dict], Any], *, tail: bytes = b"") -> Callable:
    """The good checkpoint with its safetensors header rewritten by ``mutate`` (in place)."""

    def data(s: Shared) -> bytes:
        h, body = _split(s.ckpt.read_bytes())
        mutate(h)
        return _join(h, body + tail)

    return raw(name, data)


def record(name: str, **changes) -> Callable:
    """The good checkpoint with fields of tensorscope's record (in the header) changed."""

    def mutate(h: dict) -> None:
        rec = json.loads(h["__metadata__"]["tensorscope"])
        rec.update(changes)
        h["__metadata__"]["tensorscope"] = json.dumps(rec)

    return header(name, mutate)


def tensors_of(h: dict) -> list[str]:
    """The header's tensor names in the order of their data."""
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _overlap(h: dict) -> None:
    a, b = (h[k] for k in tensors_of(h)[:2])
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _beyond_end(h: dict) -> None:
    last = h[tensors_of(h)[-1]]
    b, e = last["data_offsets"]
    last["data_offsets"] = [b + 10**9, e + 10**9]  # consistent size, but far past the end


def _huge_shape(h: dict) -> None:
    h[tensors_of(h)[0]]["shape"] = [100_000, 100_000]  # declares 40 GB in a few KB


def _f32_as_i32(h: dict) -> None:
    h[next(k for k in tensors_of(h) if h[k]["dtype"] == "F32")]["dtype"] = "I32"  # same bytes, wrong kind


def _set(key: str, value: Any, which: int = 0) -> Callable[[dict], None]:
    def mutate(h: dict) -> None:
        h[tensors_of(h)[which]][key] = value

    return mutate


def declare_huge(data: bytes) -> bytes:
    """A zip whose central directory declares ~4 GiB per entry (the bytes stay tiny)."""
    buf = bytearray(data)
    i = buf.find(b"PK\x01\x02")
    while i >= 0:
        buf[i + 24:i + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size
        i = buf.find(b"PK\x01\x02", i + 4)
    return bytes(buf)


def plan_text(text: str | bytes) -> Callable:
    return raw("plan.json", text.encode() if isinstance(text, str) else text)


def plan_layers(layers: Any) -> Callable:
    return plan_text(json.dumps({"tensorscope_plan": 1, "layers": layers}))


def svd(rank: Any, layer: str = "head", **extra) -> Callable:
    return plan_layers({layer: {"method": "svd", "rank": rank, **extra}})


def npz(name: str, **arrays: Callable[[], np.ndarray]) -> Callable:
    def build(tmp: Path, s: Shared) -> Path:
        p = tmp / name
        np.savez(p, **{k: f() for k, f in arrays.items()})
        return p

    return build


def ref(text: str) -> Callable:
    return lambda tmp, s: text


def module_ref(body: str, attr: str = "net") -> Callable:
    """A module file in tmp_path (importable: tmp_path is on sys.path in every case)."""

    def build(tmp: Path, s: Shared) -> str:
        name = f"ts_hostile_{abs(hash((body, attr))) % 10**8}"
        (tmp / f"{name}.py").write_text(body)
        return f"{name}:{attr}"

    return build


def mkdir(name: str) -> Callable:
    def build(tmp: Path, s: Shared) -> Path:
        (tmp / name).mkdir()
        return tmp / name

    return build


def nowhere(name: str) -> Callable:
    return lambda tmp, s: tmp / name


def sd_with(**changes: Callable[[dict], Any]) -> Callable[[Shared, Path], dict]:
    """small_cnn's state dict with entries replaced (``None`` deletes one)."""

    def obj(s: Shared, tmp: Path) -> dict:
        sd = {k: v.clone() for k, v in s.model.state_dict().items()}
        for key, fn in changes.items():
            key = key.replace("__", ".")
            if fn is None:
                del sd[key]
            else:
                sd[key] = fn(sd.get(key))
        return sd

    return obj


def float_to(dtype: torch.dtype) -> Callable[[Shared, Path], dict]:
    return lambda s, tmp: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.model.state_dict().items()}


def nan_weights(s: Shared, tmp: Path) -> dict:
    sd = {k: v.clone() for k, v in s.model.state_dict().items()}
    sd["down.weight"][0, 0, 0, 0] = float("nan")
    sd["head.bias"][0] = float("inf")
    return sd


def payload(s: Shared, tmp: Path) -> dict:
    return {"weights": torch.zeros(2), "x": archs.Payload(str(tmp / "MARKER"))}


def import_payload(s: Shared, tmp: Path) -> dict:
    (tmp / "ts_hostile_evil_zz.py").write_text(f"open({str(tmp / 'MARKER')!r}, 'w').close()\n")
    return {"w": torch.ones(1), "m": archs.ImportPayload("ts_hostile_evil_zz")}


def seeded_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- entry points -------------------------------------------------------------------------


def _compress_tiny(s: Shared, plan: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        return ts.compress(s.model, plan)


def api_plan(target: Path, s: Shared) -> None:
    """Parse the plan from its bytes and from its file (same class both ways), then apply it."""
    try:
        ts.Plan.from_json(target.read_bytes())
    except PlanError as first:
        with pytest.raises(type(first)):
            ts.Plan.load(target)
        raise
    _compress_tiny(s, ts.Plan.load(target))


def api_compress(target: Path, s: Shared) -> None:
    model = ts.load_model(target, arch=ARCH)
    _compress_tiny(s, {"down": {"method": "svd", "rank": 3}}).eval()  # a good plan works meanwhile
    ts.compress(model, {"down": {"method": "svd", "rank": 3}})


API: dict[str, Callable[[Any, Shared], Any]] = {
    "load": lambda t, s: ts.load(t),
    "load_model": lambda t, s: ts.load_model(t, arch=ARCH),
    "compress": api_compress,
    "plan": api_plan,
    "data": lambda t, s: load_data_file(t),
    "arch": lambda t, s: ts.load_model(s.sd_pt, arch=t),
}

CLI: dict[str, Callable[[str, Shared, str], list[str]]] = {
    "load": lambda t, s, out: ["inspect", t],
    "load_model": lambda t, s, out: ["inspect", t, "--arch", ARCH],
    "compress": lambda t, s, out: ["compress", t, "--arch", ARCH, "--plan", str(s.plan_file), "-o", out],
    "plan": lambda t, s, out: ["compress", str(s.plain), "--plan", t, "-o", out],
    "data": lambda t, s, out: ["compress", str(s.plain), "--keep", "0.5", "--data", t, "-o", out],
    "arch": lambda t, s, out: ["inspect", str(s.sd_pt), "--arch", t],
}


@dataclass
class Case:
    id: str
    build: Callable[[Path, Shared], Any]
    entry: str  # a key of API / CLI
    exc: type[BaseException]
    fragment: str  # the API message must contain this
    cli: bool | str = True  # False: no CLI run; a str: the fragment the CLI's line must contain instead
    warns: type[Warning] | None = None  # a warning the API call must give on the way


C = Case
CASES: list[Case] = [
    # -- any file: what it is not ------------------------------------------------------------
    C("random_bytes", raw("m.pt", seeded_bytes(4096)), "load", CheckpointError, "header",
      cli="is neither a safetensors file, a torch.save file nor a Hugging Face folder"),
    C("random_bytes_weights", raw("w.pt", seeded_bytes(4096, 1)), "load_model", CheckpointError,
      "is neither a safetensors file, a torch.save file nor a Hugging Face folder"),
    C("empty_file", raw("m.pt", b""), "load", CheckpointError, "empty (0 bytes)"),
    C("five_bytes", raw("m.pt", b"\x01\x02\x03\x04\x05"), "load", CheckpointError, "shorter than the 8-byte",
      cli="neither a safetensors"),
    C("directory", mkdir("m.pt"), "load", CheckpointError, "is a directory", cli="config.json"),
    C("missing_path", nowhere("nope.pt"), "load", FileNotFoundError, "no such file"),
    C("truncated_checkpoint", raw("m.pt", lambda s: s.ckpt.read_bytes()[: s.ckpt.stat().st_size // 2]), "load",
      CheckpointError, "truncated"),
    C("truncated_torch_zip", raw("w.pt", lambda s: s.sd_pt.read_bytes()[: s.sd_pt.stat().st_size // 2]),
      "load_model", CheckpointError, "zip directory cannot be read"),
    C("zip_bomb_declared_sizes", raw("w.pt", lambda s: declare_huge(s.sd_pt.read_bytes())), "load_model",
      FileTooLargeError, "once unpacked"),
    C("torch_file_given_to_load", tsave("w.pt", sd_with()), "load", CheckpointError, "tensorscope.load_model(",
      cli="arch="),
    C("not_a_state_dict", tsave("w.pt", lambda s, t: [torch.ones(2), 3]), "load_model", CheckpointError,
      "not a state dict"),
    # -- pickles that would run code (trust=False, the default) ----------------------------
    C("pickle_os_system_zip", tsave("evil.pt", payload), "load_model", UntrustedFileError, "trust=True"),
    C("pickle_os_system_legacy", tsave("evil.pt", payload, _use_new_zipfile_serialization=False), "load_model",
      UntrustedFileError, "would execute code"),
    C("pickle_os_system_raw", raw("evil.pt", lambda s: pickle.dumps({"x": archs.Payload("MARKER")}, protocol=2)),
      "load_model", UntrustedFileError, "would execute code"),
    C("pickle_imports_a_module", tsave("evil.pt", import_payload), "load_model", UntrustedFileError,
      "import_module"),
    C("pickled_whole_module", tsave("whole.pt", lambda s, t: s.model), "load_model", UntrustedFileError,
      "trust=True"),
    # -- state dicts that do not fit the architecture ------------------------------------------
    C("missing_keys", tsave("w.pt", sd_with(head__weight=None)), "load_model", CheckpointError,
      "missing keys: head.weight"),
    C("missing_keys_safetensors", st_save("w.safetensors", lambda s: sd_with(head__bias=None)(s, None)),
      "load_model", CheckpointError, "missing keys: head.bias"),
    C("extra_keys", tsave("w.pt", sd_with(extra__weight=lambda v: torch.zeros(3))), "load_model",
      CheckpointError, "unexpected keys: extra.weight"),
    C("wrong_shapes", tsave("w.pt", sd_with(head__weight=lambda v: torch.zeros(3, 32))), "load_model",
      CheckpointError, "wrong shapes: head.weight: file (3, 32) vs model (10, 32)"),
    C("wrong_shapes_safetensors", st_save("w.safetensors", lambda s: sd_with(down__bias=lambda v: v[:5])(s, None)),
      "load_model", CheckpointError, "wrong shapes: down.bias"),
    C("wrong_dtype_integer_weights", tsave("w.pt", float_to(torch.int32)), "load_model", CheckpointError,
      "wrong dtypes: "),
    C("wrong_dtype_complex_weights", st_save("w.safetensors", lambda s: float_to(torch.complex64)(s, None)),
      "load_model", CheckpointError, "wrong dtypes: "),
    C("wrong_dtype_in_checkpoint_header", header("m.pt", _f32_as_i32), "load", CheckpointError,
      "wrong dtypes: "),
    C("sparse_weights", tsave("w.pt", sd_with(head__weight=lambda v: v.to_sparse())), "load_model",
      CheckpointError, "not dense tensors: head.weight"),
    C("meta_tensor_weights", tsave("w.pt", sd_with(head__weight=lambda v: torch.empty(10, 32, device="meta"))),
      "load_model", CheckpointError, "not dense tensors: head.weight"),
    # NaN/Inf: documented as loaded with a NonFiniteWarning; compress then refuses the layer
    C("nan_inf_weights", tsave("w.pt", nan_weights), "compress", NonFiniteWeightError, "NaN/Inf",
      warns=NonFiniteWarning),
    # -- safetensors headers that lie ------------------------------------------------------------
    C("header_length_past_eof", raw("m.pt", lambda s: (10**6).to_bytes(8, "little") + b'{"a": 1}'), "load",
      CheckpointError, "but the file is only", cli="neither a safetensors"),
    C("header_length_huge", raw("m.pt", lambda s: (1 << 40).to_bytes(8, "little") + s.ckpt.read_bytes()[8:]),
      "load", CheckpointError, "safetensors allows", cli="neither a safetensors"),
    C("header_not_json", raw("m.pt", (6).to_bytes(8, "little") + b"{nope}" + bytes(16)), "load",
      CheckpointError, "not JSON"),
    C("header_json_array", raw("m.pt", (2).to_bytes(8, "little") + b"[]"), "load", CheckpointError,
      "not an object", cli="neither a safetensors"),
    C("offsets_overlap", header("m.pt", _overlap), "load", CheckpointError, "overlaps the previous tensor"),
    C("offsets_out_of_range", header("m.pt", _beyond_end), "load", CheckpointError, "which has only"),
    C("offsets_reversed", header("m.pt", _set("data_offsets", [64, 0])), "load", CheckpointError,
      "0 <= begin <= end"),
    C("trailing_bytes", header("m.pt", lambda h: None, tail=bytes(100)), "load", CheckpointError,
      "the tensors cover"),
    C("shape_times_dtype_mismatch", header("m.pt", _huge_shape), "load", CheckpointError,
      "contradicts itself"),
    C("negative_shape", header("m.pt", _set("shape", [-1, 4])), "load", CheckpointError,
      "non-negative integers"),
    C("unknown_dtype", header("m.pt", _set("dtype", "F99")), "load", CheckpointError, "unsupported dtype"),
    C("metadata_not_strings", header("m.pt", lambda h: h.__setitem__("__metadata__", {"tensorscope": 5})),
      "load", CheckpointError, '"__metadata__" must map strings to strings'),
    # (the CLI streams a plain .safetensors given without --arch: `tensorscope inspect m.safetensors` works)
    C("plain_safetensors_given_to_load", header("m.safetensors", lambda h: h.pop("__metadata__")), "load",
      CheckpointError, "without tensorscope's metadata", cli=False),
    # -- tensorscope's record --------------------------------------------------------------------
    C("future_format_version", record("m.pt", format=999, tensorscope_version="9.0"), "load", CheckpointError,
      "Upgrade tensorscope"),
    C("format_version_not_int", record("m.pt", format="1"), "load", CheckpointError, "format version is '1'"),
    C("record_not_json", header("m.pt", lambda h: h["__metadata__"].__setitem__("tensorscope", "{nope")), "load",
      CheckpointError, "metadata is not JSON"),
    C("record_plan_invalid", record("m.pt", plan={"tensorscope_plan": 1, "layers": 3}), "load", CheckpointError,
      "its plan is invalid"),
    C("record_arch_malformed", record("m.pt", arch={"ref": "os.system('x')", "kwargs": {}}), "load",
      CheckpointError, "is not 'package.module:factory'"),
    C("record_arch_gadget", record("m.pt", arch={"ref": "subprocess:run", "kwargs": {"args": ["touch", "MARKER"]}}),
      "load", UntrustedFileError, "could run arbitrary code"),
    C("record_arch_missing_module", record("m.pt", arch={"ref": "no_such_pkg_zz.models:Net", "kwargs": {}}),
      "load", ArchitectureError, "could not import module 'no_such_pkg_zz.models'"),
    C("record_without_arch", record("m.pt", arch=None), "load", CheckpointError, "records no architecture"),
    C("record_bad_aliases", record("m.pt", aliases={"x": "no.such.tensor"}), "load", CheckpointError,
      '"aliases" must map'),
    C("record_fold_bn_not_bool", record("m.pt", fold_bn="yes"), "load", CheckpointError, '"fold_bn" must be'),
    C("record_fold_pairs_malformed", record("m.pt", fold_bn=True, fold_pairs=[["conv"]]), "load", CheckpointError,
      '"fold_pairs" must be'),
    # -- plans -----------------------------------------------------------------------------------------
    C("plan_malformed_json", plan_text('{"tensorscope_plan": 1, "layers": {'), "plan", PlanError, "not valid JSON"),
    C("plan_not_utf8", plan_text(b'{"tensorscope_plan": 1, "layers": {"\xff": 1}}'), "plan", PlanError, "UTF-8"),
    C("plan_top_level_list", plan_text("[1, 2]"), "plan", PlanError, "is a JSON object; got list"),
    C("plan_top_level_string", plan_text('"svd"'), "plan", PlanError, "is a JSON object; got str"),
    C("plan_layers_not_object", plan_text('{"tensorscope_plan": 1, "layers": [1]}'), "plan", PlanError,
      '"layers" must be an object'),
    C("plan_version_missing", plan_text('{"layers": {}}'), "plan", PlanError, '"tensorscope_plan" (format version)'),
    C("plan_future_version", plan_text('{"tensorscope_plan": 7, "layers": {}}'), "plan", PlanError,
      "version 7 is not supported"),
    C("plan_unknown_top_level_key", plan_text('{"tensorscope_plan": 1, "layers": {}, "x": 1}'), "plan",
      PlanError, "unknown top-level key(s) in plan: ['x']"),
    C("plan_entry_not_object", plan_layers({"head": 8}), "plan", PlanError, "each entry is an object"),
    C("plan_entry_without_rank", plan_layers({"head": {"method": "svd"}}), "plan", PlanError,
      'needs both "method" and "rank"'),
    C("plan_unknown_layer", plan_layers({"nope": {"method": "svd", "rank": 2}}), "plan", PlanError,
      "which the model does not have"),
    C("plan_layer_typo", plan_layers({"haed": {"method": "svd", "rank": 2}}), "plan", PlanError,
      "did you mean 'head'"),
    C("plan_layer_not_decomposable", plan_layers({"stem.1": {"method": "svd", "rank": 2}}), "plan", PlanError,
      "cannot be decomposed"),
    C("plan_unknown_method", plan_layers({"head": {"method": "qr", "rank": 2}}), "plan", PlanError,
      "unknown method 'qr'; available methods"),
    C("plan_method_not_string", plan_layers({"head": {"method": ["svd"], "rank": 2}}), "plan", PlanError,
      "method must be a string"),
    C("plan_method_wrong_layer_kind", plan_layers({"head": {"method": "cp", "rank": 2}}), "plan", PlanError,
      "handles conv2d layers, not linear"),
    C("plan_unknown_option", svd(2, sweeps=3), "plan", PlanError, "unknown key(s) ['sweeps'] for method 'svd'"),
    C("plan_option_out_of_range", plan_layers({"down": {"method": "cp", "rank": 2, "iters": 10**9}}), "plan",
      PlanError, "iters must be an integer in [0, 10000]"),
    C("plan_rank_negative", svd(-3), "plan", RankError, "rank -3 is out of range"),
    C("plan_rank_zero", svd(0), "plan", RankError, "rank 0 is out of range"),
    C("plan_rank_too_large", svd(11), "plan", RankError, "use an integer in [1, 10]"),
    C("plan_rank_float_above_one", svd(1.5), "plan", RankError, "must lie in (0, 1]"),
    C("plan_rank_float_zero", svd(0.0), "plan", RankError, "must lie in (0, 1]"),
    C("plan_rank_float_negative", svd(-0.25), "plan", RankError, "must lie in (0, 1]"),
    C("plan_rank_nan", plan_text('{"tensorscope_plan": 1, "layers": {"head": {"method": "svd", "rank": NaN}}}'),
      "plan", RankError, "rank must be finite"),
    C("plan_rank_string", svd("8"), "plan", PlanError, "rank must be an integer"),
    C("plan_rank_bool", svd(True), "plan", PlanError, "rank must be an integer"),
    C("plan_tucker2_rank_wrong_length", plan_layers({"down": {"method": "tucker2", "rank": [1, 2, 3]}}), "plan",
      RankError, "tucker2: rank must be [r_out, r_in]"),
    C("plan_tt_shapes_do_not_multiply", plan_layers({"head": {"method": "tt", "rank": 2, "in_shape": [3, 3],
                                                             "out_shape": [2, 5]}}),
      "plan", PlanError, "in_shape multiplies to 9, not in_features=32"),
    C("plan_tt_shape_not_positive", plan_layers({"head": {"method": "tt", "rank": 2, "in_shape": [0, 32]}}),
      "plan", PlanError, "in_shape must be a list of positive integers"),
    C("plan_tt_bonds_not_one_at_ends", plan_layers({"head": {"method": "tt", "rank": [2, 2, 2], "in_shape": [4, 8],
                                                            "out_shape": [2, 5]}}),
      "plan", RankError, "must start and end with 1"),
    # huge ranks: refused by range, never attempted (the peak-memory check below guards it)
    C("plan_huge_rank_svd", svd(10**12), "plan", RankError, "rank 1000000000000 is out of range"),
    C("plan_huge_rank_tucker2", plan_layers({"down": {"method": "tucker2", "rank": [10**9, 10**9]}}), "plan",
      RankError, "r_out 1000000000 is out of range"),
    C("plan_huge_rank_cp", plan_layers({"block.conv1": {"method": "cp", "rank": 2**62}}), "plan", RankError,
      "is out of range for this layer"),
    C("plan_huge_rank_tt", plan_layers({"head": {"method": "tt", "rank": 10**9}}), "plan", RankError,
      "out of range"),
    C("plan_rank_with_5000_digits", plan_text('{"tensorscope_plan": 1, "layers": {"head": {"method": "svd", '
                                              '"rank": ' + "9" * 5000 + "}}}"),
      "plan", PlanError, "not valid JSON"),
    C("plan_over_8_mb", plan_text('{"tensorscope_plan": 1, "layers": {}, "pad": "' + "x" * (9 << 20) + '"}'),
      "plan", PlanError, "are refused"),
    # -- architecture references -----------------------------------------------------------------
    C("arch_module_missing", ref("no_such_pkg_zz.models:Net"), "arch", ArchitectureError,
      "could not import module 'no_such_pkg_zz.models'"),
    C("arch_attribute_missing", ref("archs:NoSuchNet"), "arch", ArchitectureError, "has no attribute 'NoSuchNet'"),
    C("arch_malformed", ref("archs.SmallCNN"), "arch", ArchitectureError, "looks like 'package.module:factory'"),
    C("arch_module_raises_on_import", module_ref("raise RuntimeError('boom at import')\n"), "arch",
      ArchitectureError, "RuntimeError: boom at import"),
    C("arch_factory_raises", module_ref("def net():\n    raise ValueError('boom in factory')\n"), "arch",
      ArchitectureError, "raised ValueError: boom in factory"),
    C("arch_factory_needs_arguments", ref("archs:make_mlp"), "arch", ArchitectureError, "raised TypeError"),
    C("arch_not_callable", ref("math:pi"), "arch", ArchitectureError, "is not callable"),
    C("arch_returns_non_module", ref("collections:OrderedDict"), "arch", ArchitectureError,
      "returned OrderedDict, not an nn.Module"),
    # -- data files ---------------------------------------------------------------------------------
    C("data_empty_file", raw("d.pt", b""), "data", DataError, "empty (0 bytes)"),
    C("data_random_bytes", raw("d.pt", seeded_bytes(500, 2)), "data", DataError, "weights_only=True"),
    C("data_random_bytes_npz", raw("d.npz", seeded_bytes(500, 3)), "data", DataError, "not a readable .npz"),
    C("data_npz_object_array", npz("d.npz", x=lambda: np.array([{"a": 1}, None], dtype=object)), "data",
      DataError, "Object arrays cannot be loaded"),
    C("data_npz_member_is_a_pickle", raw("d.npz", lambda s: _zip({"x.npy": pickle.dumps(np.ones(3))})), "data",
      DataError, "not numbers"),
    C("data_npz_strings", npz("d.npz", x=lambda: np.array(["a", "b"])), "data", DataError, "not numbers"),
    C("data_pickle_payload", tsave("d.pt", lambda s, t: {"x": archs.Payload(str(t / "MARKER"))}), "data",
      DataError, "weights_only=True"),
    C("data_labels_wrong_length", tsave("d.pt", lambda s, t: {"x": torch.ones(4, 3), "y": torch.zeros(3).long()}),
      "data", DataError, "one class index per sample (4)"),
    C("data_labels_2d", npz("d.npz", x=lambda: np.ones((4, 3), np.float32), y=lambda: np.zeros((4, 2))), "data",
      DataError, "labels must be a 1-D tensor"),
    C("data_labels_fractional", npz("d.npz", x=lambda: np.ones((3, 2), np.float32), y=lambda: np.array([0, .5, 1])),
      "data", DataError, "integer class indices"),
    C("data_labels_inf", npz("d.npz", x=lambda: np.ones((3, 2), np.float32), y=lambda: np.array([0, np.inf, 1])),
      "data", DataError, "integer class indices"),
    C("data_nan_inputs", tsave("d.pt", lambda s, t: (torch.tensor([[1.0, float("nan")]]), torch.tensor([0]))),
      "data", DataError, "NaN or Inf"),
    C("data_inf_inputs", npz("d.npz", inputs=lambda: np.array([[np.inf, 1.0]], np.float32)), "data", DataError,
      "NaN or Inf"),
    C("data_no_samples", tsave("d.pt", lambda s, t: torch.empty(0, 3)), "data", DataError, "non-empty tensor"),
    C("data_scalar_inputs", npz("d.npz", x=lambda: np.float32(3.0)), "data", DataError, "non-empty tensor"),
    C("data_wrong_container", tsave("d.pt", lambda s, t: [torch.ones(2), torch.ones(2), torch.ones(2)]), "data",
      DataError, "holds list"),
    C("data_dict_without_inputs", tsave("d.pt", lambda s, t: {"y": torch.zeros(3), "note": "hi"}), "data",
      DataError, "holds dict"),
    C("data_complex_inputs", tsave("d.pt", lambda s, t: torch.ones(3, 2, dtype=torch.complex64)), "data", DataError,
      "real numbers"),
    C("data_sparse_inputs", tsave("d.pt", lambda s, t: torch.ones(3, 2).to_sparse()), "data", DataError,
      "dense tensor"),
    C("data_wrong_extension", raw("d.csv", b"1,2,3\n"), "data", DataError, "must be .pt/.pth (torch.save) or .npz"),
    C("data_zip_bomb_npz", raw("d.npz", lambda s: declare_huge(_npz_bytes(x=np.ones(4), y=np.ones(4)))), "data",
      FileTooLargeError, "a zip bomb?"),
    C("data_missing", nowhere("d.pt"), "data", FileNotFoundError, "no such data file"),
    C("data_directory", mkdir("d.pt"), "data", DataError, "not a regular file"),
]


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_the_corpus_is_one_table_of_at_least_40_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 40, len(CASES)
    for c in CASES:
        assert issubclass(c.exc, TensorscopeError) or c.exc is FileNotFoundError, c.id
        assert c.entry in API and c.fragment, c.id


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb * 1024


def _still_works(s: Shared) -> None:
    """The process keeps working after a refusal: a good load is exact, a good plan compresses."""
    with torch.no_grad():
        torch.testing.assert_close(ts.load(s.ckpt)(s.x), s.ckpt_out, rtol=0, atol=0)
        out = _compress_tiny(s, GOOD_PLAN)(s.x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly(case: Case, sh: Shared, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))  # module_ref files are importable...
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # ...without leaving __pycache__ behind
    monkeypatch.delenv("TENSORSCOPE_MAX_FILE_BYTES", raising=False)
    target = case.build(tmp_path, sh)
    inputs = _files(tmp_path)
    modules = set(sys.modules)
    peak = _peak_rss()

    # the library API
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(case.exc) as info:
            API[case.entry](target, sh)
    assert type(info.value) is case.exc or issubclass(type(info.value), case.exc)
    message = str(info.value)
    assert case.fragment in message, f"{case.id}: message lacks {case.fragment!r}:\n{message}"
    if case.warns is not None:
        assert any(issubclass(w.category, case.warns) for w in caught), [str(w.message) for w in caught]

    # the CLI: exit status 2, one line on stderr, no output file
    if case.cli is not False:
        out = tmp_path / "out.pt"
        capsys.readouterr()
        rc = main([*CLI[case.entry](str(target), sh, str(out)), "-q"])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == EXIT_BAD_INPUT, (rc, err)
        assert len(lines) == 1 and lines[0].startswith("tensorscope ") and ": error: " in lines[0], err
        want = case.cli if isinstance(case.cli, str) else case.fragment
        assert want in lines[0], f"{case.id}: CLI line lacks {want!r}:\n{lines[0]}"
        assert not out.exists()

    # nothing written half-way, no payload ran, no module imported by a refused file
    assert _files(tmp_path) == inputs, _files(tmp_path) ^ inputs
    assert not (Path.cwd() / "MARKER").exists()
    assert "ts_hostile_evil_zz" not in set(sys.modules) - modules
    assert _peak_rss() - peak < MAX_PEAK_GROWTH, f"{case.id}: peak RSS grew by {(_peak_rss() - peak) >> 20} MB"
    _still_works(sh)


# ---- properties ---------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
LAYER_NAMES = ["stem.0", "stem.1", "block.conv1", "block.conv2", "down", "head", "", "nope", "pool"]
METHOD_NAMES = ["svd", "tucker2", "cp", "tt", "qr", "", "SVD"]
RANKS = (st.integers(-3, 600) | st.floats(-1.0, 2.0) | st.just(math.nan) | st.just(1.0)
         | st.lists(st.integers(-1, 40), min_size=0, max_size=5) | JSONISH)
ENTRY = st.fixed_dictionaries(
    {"method": st.sampled_from(METHOD_NAMES) | JSONISH, "rank": RANKS},
    optional={"sweeps": st.integers(-2, 20) | JSONISH, "iters": st.integers(-2, 20) | JSONISH,
              "seed": st.integers(-2, 20), "in_shape": st.lists(st.integers(-1, 40), max_size=4) | JSONISH,
              "out_shape": st.lists(st.integers(-1, 40), max_size=4) | JSONISH, "extra": JSONISH},
) | JSONISH
DOC = st.fixed_dictionaries(
    {"tensorscope_plan": st.sampled_from([1, 1, 1, 2, 0, None, "1", 1.5]) | JSONISH,
     "layers": st.dictionaries(st.sampled_from(LAYER_NAMES) | st.text(max_size=8), ENTRY, max_size=4) | JSONISH},
    optional={"other": JSONISH},
) | JSONISH
KEYS = st.text(max_size=4) | st.integers(-2, 2) | st.none() | st.tuples(st.integers(0, 2))
PY_VALUES = st.recursive(  # what a Python caller may pass to from_dict / Plan(): not only JSON
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=4) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOC)
def test_plan_parsing_and_validation_raise_only_plan_errors(doc, sh):
    text = json.dumps(doc, allow_nan=True)
    try:
        plan = ts.Plan.from_json(text)
    except PlanError:
        with pytest.raises(PlanError):
            ts.Plan.from_dict(json.loads(text))
        return
    assert ts.Plan.from_json(plan.to_json()) == plan  # what parses round-trips
    try:
        resolved = plan.validate(sh.model)
    except PlanError:
        return
    assert [r.name for r in resolved] == list(plan.layers)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60) | st.binary(max_size=60)
       | st.builds(lambda d: json.dumps(d, allow_nan=True)[: len(json.dumps(d)) // 2], DOC))
def test_plan_from_json_on_garbage_raises_only_plan_errors(text):
    try:
        ts.Plan.from_json(text)
    except PlanError:
        pass


@settings(max_examples=150, deadline=None)
@given(doc=PY_VALUES | st.dictionaries(KEYS, PY_VALUES, max_size=3)
       | st.fixed_dictionaries({"tensorscope_plan": st.just(1),
                                "layers": st.dictionaries(KEYS, st.dictionaries(KEYS, PY_VALUES, max_size=3)
                                                          | PY_VALUES, max_size=3)},
                               optional={2: PY_VALUES}))
def test_plan_from_dict_and_constructor_raise_only_plan_errors(doc):
    for build in (ts.Plan.from_dict, ts.Plan):
        try:
            build(doc)
        except PlanError:
            pass


# ---- ts.compress over random small layers -------------------------------------------------------

#: full-rank reconstructions are exact up to float32 rounding; relative to the output's scale
FULL_RANK_RTOL = 1e-4
FULL_RANK_ATOL = 1e-4


@st.composite
def layers(draw):
    bias = draw(st.booleans())
    if draw(st.booleans()):
        layer = nn.Linear(draw(st.integers(1, 12)), draw(st.integers(1, 12)), bias=bias)
        return layer, (3, layer.in_features)
    groups = draw(st.sampled_from([1, 1, 1, 2, 3, 4]))
    cin = groups * draw(st.integers(1, max(1, 12 // groups)))
    cout = groups * draw(st.integers(1, max(1, 12 // groups)))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2, (0, 1), "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular", "replicate"]))
    if mode == "reflect" and padding not in ("valid", 0) and max(kernel) > 3:
        mode = "zeros"
    layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=bias, padding_mode=mode)
    return layer, (2, cin, 9, 9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=layers(), method=st.sampled_from(["svd", "tucker2", "cp", "tt"]),
       rank=st.sampled_from(["full", "full", 1.0]) | st.integers(-2, 40) | st.floats(-0.5, 1.5) | st.just(math.nan)
       | st.lists(st.integers(-1, 12), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_compress_random_layers_is_exact_at_full_rank_or_refuses(spec, method, rank, seed):
    torch.manual_seed(seed)
    layer, shape = spec
    model = nn.Sequential(layer).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    infos = ts.inspect(model)
    max_rank = infos[0].max_rank.get(method) if len(infos) else None
    if rank == "full":
        rank = list(max_rank) if isinstance(max_rank, tuple) else (max_rank if max_rank is not None else 1)
    full = (isinstance(rank, float) and rank == 1.0) or (max_rank is not None and rank == (list(max_rank) if isinstance(max_rank, tuple) else max_rank))
    plan = {"0": {"method": method, "rank": rank}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ts.BreakEvenWarning)
            small = ts.compress(model, plan)
            cost = ts.plan_cost(model, plan)
    except TensorscopeError:
        return  # refused, with a tensorscope error: fine
    with torch.no_grad():
        out = small(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "NaN/Inf output from finite weights and inputs"
    assert sum(p.numel() for p in small.parameters()) == cost["params_after"]
    assert ts.plan_of(small) == ts.Plan(plan)
    if full:
        scale = max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(out, ref, rtol=FULL_RANK_RTOL, atol=FULL_RANK_ATOL * scale)


def test_calibration_data_the_model_cannot_take_is_one_clear_error_everywhere():
    """Wrong channels, a dict key the model does not take, NaN: a DataError naming the batch,
    from collect_stats, plan_for_budget and compress alike (never a raw RuntimeError or a
    LAPACK failure), and the model untouched."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        r"\(4, 5, 8, 8\).*failed in the model's forward": [torch.randn(4, 5, 8, 8)],
        r"foo: .*failed in the model's forward.*unexpected keyword": [{"foo": torch.randn(4, 3, 8, 8)}],
        "non-finite": [torch.full((4, 3, 8, 8), float("nan"))],
    }
    plan = ts.Plan({"3": {"method": "svd", "rank": 2}})
    for what, data in cases.items():
        for run in (lambda d: ts.collect_stats(model, d), lambda d: ts.plan_for_budget(model, keep=0.5, data=d),
                    lambda d: ts.compress(model, plan, data=d)):
            with pytest.raises(ts.DataError, match=what):
                run(data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
