"""Property-based fuzz suite: untrusted input of every family against the one contract.

Every generated input ends in exit 0 with valid output, exit 1 (gate only: a well-formed input that fails a check),
or exit 2 with exactly one line on stderr; never a traceback, never a partial output file, never code executed.
The readers are also compared with independent references on the same bytes: the safetensors library's own verdict
on headers, pickletools' opcode listing and the pickle module's own ``find_class`` calls on pickles.

Seeded (hypothesis ``derandomize``) with a fixed example budget so that the suite takes about a minute inside
``make test``; ``make fuzz`` runs it with CKPTAUDIT_FUZZ_SCALE=20 (twenty times the examples).
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import fuzz_payloads
import h5py
import numpy as np
import pytest
import torch
from cli_helpers import MINIMAL_POLICY, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptaudit.io.pickle_scan import PickleScanError, scan_pickle
from ckptaudit.io.safetensors_header import DTYPE_BITS, HeaderError, read_header_file
from ckptaudit.io.safety import UNREADABLE, UNSAFE, file_safety

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on planted pickles

SCALE = max(1, int(os.environ.get("CKPTAUDIT_FUZZ_SCALE", "1")))


def budget(n: int):
    """Seeded hypothesis settings with ``n`` x SCALE examples and no deadline (the CLI runs vary in time)."""
    return settings(max_examples=n * SCALE, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------ the contract


def check_contract(result, outputs: list[Path] = (), gate: bool = False, json_stdout: bool = False) -> None:
    """Exit 0 (valid output), 1 (gate only) or 2 (one line); no traceback; every output complete or absent."""
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err, err[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    code = result.exit_code
    assert code in ((0, 1, 2) if gate else (0, 2)), (code, err[-500:])
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("ckptaudit: error:"), err
        for p in outputs:
            assert not Path(p).exists(), f"{p} written although the input was refused"
    if code == 1:
        assert len(err.splitlines()) == 1 and err.startswith("ckptaudit: error:"), err
    if code == 0 and json_stdout:
        json.loads(result.stdout)
    for p in outputs:
        p = Path(p)
        if not p.exists():
            continue
        if p.suffix == ".h5":
            with h5py.File(p, "r") as f:
                assert "schema_version" in f.attrs
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".xml":
            ET.fromstring(p.read_text())
    leftovers = [q for p in outputs for q in Path(p).parent.glob(f".{Path(p).name}*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(scope="module")
def base_checkpoint(tiny_run, tmp_path_factory) -> Path:
    """A copy of the last tiny checkpoint, the starting point of every mutation."""
    return Path(shutil.copytree(tiny_run / "checkpoint-60", tmp_path_factory.mktemp("base") / "checkpoint-60"))


def _fresh(base: Path, root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    return Path(shutil.copytree(base, run / base.name))


# ------------------------------------------------------------------------------------------ safetensors headers


_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=6)
_dtype = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.sampled_from(["f32", "F17", "", "I4", "C128"]))
_shape = st.lists(st.integers(0, 5), max_size=3)


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors file: mostly consistent headers, with one of many planted faults (or none)."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    offset = 0
    for _ in range(n):
        dtype = draw(_dtype)
        shape = draw(_shape)
        numel = int(np.prod(shape)) if shape else 1
        size = (numel * DTYPE_BITS.get(dtype, 8)) // 8
        header[draw(_names.filter(lambda s: s != "__metadata__"))] = {
            "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    fault = draw(st.sampled_from(["none", "none", "trailing", "short", "overlap", "gap", "meta-int", "meta-list",
                                  "meta-ok", "swap", "extra-field", "bad-shape", "offsets3", "raw-dup", "nan",
                                  "lead-ws", "empty-len", "not-object", "junk-json"]))
    data = bytes(draw(st.binary(min_size=offset, max_size=offset)))
    keys = list(header)
    if fault == "trailing":
        data += b"\x00" * draw(st.integers(1, 5))
    elif fault == "short" and data:
        data = data[: -draw(st.integers(1, len(data)))]
    elif fault == "overlap" and keys:
        header[keys[-1]]["data_offsets"][0] = max(0, header[keys[-1]]["data_offsets"][0] - 1)
    elif fault == "gap" and keys:
        e = header[keys[0]]["data_offsets"]
        header[keys[0]]["data_offsets"] = [e[0] + 1, e[1] + 1]
        data += b"\x00"
    elif fault == "meta-int":
        header["__metadata__"] = {"a": draw(st.integers())}
    elif fault == "meta-list":
        header["__metadata__"] = []
    elif fault == "meta-ok":
        header["__metadata__"] = {"format": "pt"}
    elif fault == "swap" and len(keys) >= 2:
        a, b = header[keys[0]]["data_offsets"], header[keys[1]]["data_offsets"]
        header[keys[0]]["data_offsets"], header[keys[1]]["data_offsets"] = b, a
    elif fault == "extra-field" and keys:
        header[keys[0]]["extra"] = draw(st.one_of(st.integers(), st.text(max_size=3), st.none()))
    elif fault == "bad-shape" and keys:
        header[keys[0]]["shape"] = draw(st.sampled_from([[-1], [1.5], ["2"], [True], 3, None]))
    elif fault == "offsets3" and keys:
        header[keys[0]]["data_offsets"] = header[keys[0]]["data_offsets"] + [0]
    raw = json.dumps(header).encode()
    if fault == "raw-dup" and keys:
        k = json.dumps(keys[0])
        raw = raw[:-1] + (b", " if header else b"") + k.encode() + b": " + json.dumps(header[keys[0]]).encode() + b"}"
    elif fault == "nan":
        raw = raw[:-1] + (b", " if header else b"") + b'"__metadata__": {"a": NaN}}'
    elif fault == "lead-ws":
        raw = b" \n" + raw
    elif fault == "not-object":
        raw = b"[]"
    elif fault == "junk-json":
        raw = raw[: draw(st.integers(0, len(raw)))]
    length = 0 if fault == "empty-len" else len(raw)
    return struct.pack("<Q", length) + raw + data


def _library_accepts(data: bytes) -> bool:
    import safetensors

    try:
        safetensors.deserialize(data)
        return True
    except Exception:  # noqa: BLE001 - the library's refusal, whatever its type
        return False


@pytest.mark.slow
@budget(300)
@given(safetensors_bytes())
def test_safetensors_header_verdict_equals_the_library(data):
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        try:
            read_header_file(f.name)
            ours = True
        except HeaderError:
            ours = False
    assert ours == _library_accepts(data), data[:200]


@pytest.mark.slow
@budget(40)
@given(data=safetensors_bytes())
def test_cli_on_generated_safetensors(base_checkpoint, data):
    with tempfile.TemporaryDirectory() as d:
        ck = _fresh(base_checkpoint, Path(d))
        (ck / "model.safetensors").write_bytes(data)
        out = Path(d) / "out" / "r.h5"
        check_contract(invoke("inspect", ck.parent, "--out", out, "--no-hash", "--json"), [out], json_stdout=True)
        policy = Path(d) / "p.toml"
        policy.write_text(MINIMAL_POLICY)
        outs = [Path(d) / "g.json", Path(d) / "g.xml", Path(d) / "g.h5"]
        r = invoke("gate", ck, "--policy", policy, "--json-out", outs[0], "--junit", outs[1], "--out", outs[2], "--no-hash")
        check_contract(r, outs, gate=True)
        if not _library_accepts(data):
            assert r.exit_code == 2  # a file the library refuses is bad input, never a passed or failed check


# ------------------------------------------------------------------------------------------ pickles


_plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=4), inner, max_size=4),
                            st.frozensets(st.integers(), max_size=3), st.sets(st.text(max_size=3), max_size=3)),
    max_leaves=12)


class _Recording(pickle.Unpickler):
    """The pickle module's own unpickler, noting every global it resolves (only used on the test's own pickles of
    plain data, whose globals are builtins such as set and _codecs.encode)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.names: list[str] = []

    def find_class(self, module: str, name: str):
        self.names.append(f"{module}.{name}")
        return super().find_class(module, name)


@budget(200)
@given(obj=_plain, protocol=st.integers(0, 5))
def test_scanner_matches_pickletools_and_the_unpickler(obj, protocol):
    data = pickle.dumps(obj, protocol=protocol)
    scan = scan_pickle(data)
    listing = list(pickletools.genops(data))
    assert scan.opcodes == {op.name for op, _, _ in listing}
    assert scan.end == len(data) and scan.protocol == (protocol if protocol >= 2 else 0)
    rec = _Recording(data)
    rec.load()
    assert set(scan.globals) == set(rec.names)  # the names as written (find_class renames __builtin__ itself)
    assert not scan.ext_codes and not scan.computed_globals


@budget(150)
@given(data=st.binary(max_size=64), protocol=st.integers(0, 5))
def test_scanner_refuses_what_pickle_cannot_load(data, protocol):
    """Random bytes: when the scanner calls them a well-formed pickle without globals, the pickle module loads them
    (no find_class, so no code); when the pickle module fails, so does the scanner."""
    blob = bytes([0x80, protocol]) + data if protocol >= 2 else data
    try:
        scan = scan_pickle(blob)
    except PickleScanError:
        return
    if scan.runs_code or scan.persistent_ids or "NEXT_BUFFER" in scan.opcodes:
        return  # loading would resolve names or need buffers: never run here

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):  # pragma: no cover - a scan without globals never gets here
            raise AssertionError(f"the scanner missed {module}.{name}")

    try:
        NoGlobals(io.BytesIO(blob)).load()
    except AssertionError:
        raise
    except Exception:  # noqa: BLE001 - values the scanner does not model (bad INT text, recursion): not code
        pass


@pytest.mark.parametrize("trick", fuzz_payloads.TRICKS)
@pytest.mark.parametrize("protocol", range(6))
def test_malicious_pickle_is_named_and_never_runs(trick, protocol, tmp_path):
    """Each planted pickle names its global; torch's weights-only loader refuses it; as a bare file, inside a
    torch.save archive and inside a zip inside a zip, file_safety calls it unsafe; the marker never appears."""
    marker = tmp_path / "RAN"
    data, name = fuzz_payloads.planted(trick, protocol, str(marker))
    listing = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    used = {op for op, _ in listing}
    assert trick in used or (trick == "REDUCE" and "REDUCE" in used) or (trick == "BUILD" and "BUILD" in used)
    scan = scan_pickle(data)
    if trick.startswith("EXT"):
        assert [arg for op, arg in listing if op.startswith("EXT")] == scan.ext_codes == [int(name.split()[-1])]
    else:
        assert name in scan.globals
    bare = tmp_path / "scheduler.pt"
    bare.write_bytes(data)
    archive = tmp_path / "optimizer.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", "3\n")
    nested = tmp_path / "bundle.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner/data.pkl", data)
    with zipfile.ZipFile(nested, "w") as z:
        z.writestr("inner.zip", buf.getvalue())
    for f in (bare, archive, nested):
        verdict = file_safety(f)
        assert verdict.verdict == UNSAFE and not verdict.safe, (f.name, verdict)
        shown = name if not trick.startswith("EXT") else "extension code"
        assert shown in verdict.detail, verdict.detail
    with pytest.raises(Exception):  # noqa: B017 - torch's own refusal, whatever its class
        torch.load(archive, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("trick", ["REDUCE", "BUILD", "NEWOBJ", "STACK_GLOBAL", "EXT1"])
def test_malicious_pickles_in_a_checkpoint_through_the_cli(trick, base_checkpoint, tmp_path):
    """As scheduler.pt, optimizer.pt and rng_state.pth of a Trainer checkpoint: inspect flags it (exit 0), the
    gate fails safe_serialization (exit 1) or refuses the state it must read (exit 2); nothing ever runs."""
    marker = tmp_path / "RAN"
    data, _ = fuzz_payloads.planted(trick, 4, str(marker))
    policy = tmp_path / "p.toml"
    policy.write_text(MINIMAL_POLICY)
    for target in ("scheduler.pt", "optimizer.pt", "rng_state.pth"):
        root = tmp_path / target
        root.mkdir()
        ck = _fresh(base_checkpoint, root)
        if trick.startswith("EXT"):
            (ck / target).write_bytes(data)
        else:
            torch.save({"x": torch.zeros(1)}, ck / target)
            with zipfile.ZipFile(ck / target, "a") as z:  # a second pickle member, beside torch's own data.pkl
                z.writestr(f"{Path(target).stem}/extra.pkl", data)
        r = invoke("inspect", ck.parent, "--no-report", "--json")
        check_contract(r, json_stdout=True)
        assert r.exit_code == 0
        doc = json.loads(r.stdout)
        assert any(Path(p).name == target for p in doc["unsafe_files"]), doc["unsafe_files"]
        outs = [root / "g.json"]
        g = invoke("gate", ck, "--policy", policy, "--json-out", outs[0], "--no-report")
        check_contract(g, outs, gate=True)
        assert g.exit_code in (1, 2)
        if g.exit_code == 1:
            assert "safe_serialization" in g.stderr
    assert not marker.exists()


def test_ext_codes_registered_in_this_process_still_never_run(tmp_path):
    """Even with the extension registered in the scanning process (so a plain unpickler would resolve it), the
    scanner names the code and runs nothing."""
    marker = tmp_path / "RAN"
    data, name = fuzz_payloads.planted("EXT2", 2, str(marker))
    code = int(name.split()[-1])
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        (tmp_path / "x.pkl").write_bytes(data)
        assert file_safety(tmp_path / "x.pkl").verdict == UNSAFE
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ mutated checkpoints


_TARGETS = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "config.json", "training_args.bin"]


@st.composite
def mutation(draw):
    target = draw(st.sampled_from(_TARGETS))
    how = draw(st.sampled_from(["truncate", "flip", "empty", "replace", "append"]))
    return target, how, draw(st.integers(0, 2**31)), draw(st.binary(max_size=32))


def _mutate(path: Path, how: str, seed: int, blob: bytes) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    if how == "truncate":
        data = data[: int(rng.integers(0, max(1, len(data))))]
    elif how == "flip" and data:
        for i in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[int(i)] ^= 0xFF
    elif how == "empty":
        data = bytearray()
    elif how == "replace":
        data = bytearray(blob)
    else:
        data += blob
    path.write_bytes(bytes(data))


@pytest.mark.slow
@budget(40)
@given(m=mutation())
def test_cli_on_mutated_checkpoints(base_checkpoint, m):
    target, how, seed, blob = m
    with tempfile.TemporaryDirectory() as d:
        ck = _fresh(base_checkpoint, Path(d))
        _mutate(ck / target, how, seed, blob)
        out = Path(d) / "i.h5"
        check_contract(invoke("inspect", ck.parent, "--out", out, "--no-hash"), [out])
        policy = Path(d) / "p.toml"
        policy.write_text(MINIMAL_POLICY)
        outs = [Path(d) / "g.json", Path(d) / "g.xml", Path(d) / "g.h5"]
        g = invoke("gate", ck, "--policy", policy, "--json-out", outs[0], "--junit", outs[1], "--out", outs[2],
                   "--no-hash")
        check_contract(g, outs, gate=True)
        if target in ("optimizer.pt", "scheduler.pt", "rng_state.pth") and how == "empty":
            assert g.exit_code == 2, g.stderr  # a 0-byte Level-2 file is bad input, not "complete provenance"


# ------------------------------------------------------------------------------------------ policies, arguments

_policy_values = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.booleans(),
                           st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3))


@budget(40)
@given(table=st.sampled_from(["gate", "checks.provenance", "checks.finite", "checks.safe_serialization",
                              "checks.embedding_class", "checks.backbone", "checks.nope"]),
       key=st.sampled_from(["target", "fail_on_skipped", "require", "weights", "pairs", "rho1_min", "k95_max",
                            "allow_files", "enabled", "x"]),
       value=_policy_values, raw=st.booleans(), junk=st.text(max_size=30))
@pytest.mark.slow
def test_gate_on_generated_policies(base_checkpoint, table, key, value, raw, junk):
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(json.dumps(x) for x in v) + "]"
        return str(v)

    text = MINIMAL_POLICY + f"\n[{table}]\n{key} = {toml(value)}\n" + (junk if raw else "")
    with tempfile.TemporaryDirectory() as d:
        policy = Path(d) / "p.toml"
        policy.write_text(text, encoding="utf-8")
        outs = [Path(d) / "g.json"]
        check_contract(invoke("gate", base_checkpoint, "--policy", policy, "--json-out", outs[0], "--no-report"), outs,
                       gate=True)


_arg_text = st.one_of(st.text(max_size=12), st.integers(min_value=-(2**70), max_value=2**70).map(str),
                      st.sampled_from(["0:²", "٣", "nan", "inf", "-1", "0", "1e309", "::0", "1:2:3:4", "--", "",
                                       "99999999999999999999", "first,last", "0-99999999999"]))


@budget(50)
@given(option=st.sampled_from(["--steps", "--seed", "--window", "--top-k", "--anchor", "--blocks", "--switch"]),
       value=_arg_text)
@pytest.mark.slow
def test_backbone_arguments(tiny_run, option, value):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "b.h5"
        check_contract(invoke("backbone", tiny_run, option, value, "--out", out, "--no-hash", "--device", "cpu",
                              "--json"), [out], json_stdout=True)


@pytest.mark.slow
@budget(40)
@given(option=st.sampled_from(["--K", "--tolerance", "--sigma-window", "--cascade", "--predictor"]), value=_arg_text)
def test_extrapolate_arguments(tiny_run, option, value):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "e.h5"
        check_contract(invoke("extrapolate", tiny_run, "--steps", "40:60", option, value, "--out", out, "--no-hash",
                              "--device", "cpu", "--json"), [out], json_stdout=True)


# ------------------------------------------------------------------------------------------ contexts, reports


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from conftest import make_tiny_lm_dir

    vocab = {f"w{i}": i for i in range(20)} | {"[UNK]": 20, "[EOS]": 21}
    return make_tiny_lm_dir(tmp_path_factory.mktemp("lm"), vocab, unk="[UNK]", eos="[EOS]", n_embd=8, n_layer=1,
                            n_head=2)


_context_line = st.one_of(
    st.binary(max_size=40),
    st.fixed_dictionaries({"context": st.text(alphabet="w0123456789 ", max_size=80),
                           "target": st.sampled_from([" w1", "w1", "w2", "", "nope", "w1 w2"])}).map(
        lambda o: json.dumps(o).encode()),
    st.just(b"[" * 5000 + b"]" * 5000),
)


@budget(25)
@given(lines=st.lists(_context_line, min_size=0, max_size=3))
def test_born_gap_on_generated_contexts(lm_dir, lines):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.jsonl"
        f.write_bytes(b"\n".join(lines))
        out = Path(d) / "bg.h5"
        check_contract(invoke("born-gap", lm_dir, "--contexts", f, "--out", out, "--no-hash", "--device", "cpu",
                              "--json"), [out], json_stdout=True)


@budget(30)
@given(edit=st.sampled_from(["argv", "bytes", "markup", "dangling", "loop", "truncate", "nested", "schema"]),
       text=st.text(max_size=20), blob=st.binary(max_size=20))
@pytest.mark.slow
def test_report_show_on_generated_reports(edit, text, blob):
    from ckptaudit.report.hdf5 import write_report

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.h5"
        write_report(path, command="inspect", argv=["ckptaudit", text], tree={"a": [1.0, 2.0], "s": text})
        if edit == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        else:
            with h5py.File(path, "r+") as f:
                if edit == "argv":
                    f.attrs["argv"] = text or "{"
                elif edit == "bytes":
                    f.attrs["blob"] = np.bytes_(blob + b"\xff")
                elif edit == "markup":
                    f.create_group(f"[red]{text.replace('/', '')}[/x]".replace("/", "")).attrs["[b]"] = f"[/{text}]"
                elif edit == "dangling":
                    f["inspect"]["d"] = h5py.SoftLink("/no/such/" + (text.replace("/", "") or "x"))
                elif edit == "loop":
                    f["inspect"]["l"] = h5py.SoftLink("/")
                elif edit == "nested":
                    g = f["inspect"]
                    for i in range(80):
                        g = g.create_group(f"g{i}")
                elif edit == "schema":
                    del f.attrs["schema_version"]
        check_contract(invoke("report", "show", path))
        check_contract(invoke("report", "show", path, "--json"), json_stdout=True)


def test_unreadable_is_never_safe(tmp_path):
    """Content of no known kind, and files named like pickles that hold none, are unreadable, never safe."""
    cases = {"optimizer.pt": b"", "scheduler.pt": b"abc", "notes.bin": os.urandom(64) + b"\x00",
             "rng_state.pth": b"\x80\x04\x95", "weights.safetensors": struct.pack("<Q", 2) + b"{"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        v = file_safety(tmp_path / name)
        assert v.verdict == UNREADABLE and not v.safe, (name, v)
