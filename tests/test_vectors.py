"""The backbone-vector reader (ckptaudit/io/vectors.py) and its two users, fisher's ``load_vector_file`` and
resume's ``load_backbone_vector``, against independent references: files written by hand with
safetensors.torch.save_file (or raw bytes) and by the real ``run_backbone(..., save_vectors=...)``, read back with
numpy and flattened / normalised by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from runs import gpt2_config, gpt2_shapes, make_run, random_trajectory
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_gram import reference_parts, stacked

from ckptaudit.analyses.backbone.run import run_backbone
from ckptaudit.analyses.fisher.directions import load_vector_file, trunk_layout
from ckptaudit.analyses.resume.run import load_backbone_vector
from ckptaudit.errors import CorruptFileError, InputNotFoundError
from ckptaudit.io.roles import resolve_architecture
from ckptaudit.io.vectors import BLOCK_PREFIX, SWITCH_PREFIX, read_vectors

D, LAYERS = 4, 2
WRITE_HINT = "write one with `ckptaudit backbone --save-vectors`"
SIZE_HINT = "the vectors were computed on another model size"
ARCH_HINT = "the vectors were computed on another architecture"


# ------------------------------------------------------------------------------------------------ helpers


def trunk_names(layers=range(LAYERS)) -> list[str]:
    return [f"transformer.h.{b}.{n}.weight" for b in layers for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]


def manual_flat(arrays: dict[str, np.ndarray], d: int = D, layers=range(LAYERS)) -> np.ndarray:
    """The trunk in layout order written out by hand: per block Q, K, V columns of c_attn, c_proj, c_fc, mlp c_proj."""
    parts = []
    for b in layers:
        w = arrays[f"transformer.h.{b}.attn.c_attn.weight"]
        parts += [w[:, :d], w[:, d : 2 * d], w[:, 2 * d :]]
        parts += [arrays[f"transformer.h.{b}.{n}.weight"] for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])


def normed(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def random_stacks(shapes: dict, names, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 [k, *shape] per name (float32 so that the stored values are exactly these)."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((k, *shapes[n])).astype(np.float32) for n in names}


def save(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}, str(path), metadata)
    return path


def raw_safetensors(path: Path, entries: dict[str, tuple[str, tuple[int, ...], bytes]]) -> Path:
    """A safetensors file byte by byte (lets a test use a dtype code torch cannot hold)."""
    header, data = {}, b""
    for name, (code, shape, raw) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return path


def tiny_gpt2(d: int = D, layers: int = LAYERS) -> torch.nn.Module:
    """A GPT-2 whose parameter names and shapes are those of gpt2_shapes(d, layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=d, n_layer=layers, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    return gpt2_shapes(D, LAYERS)


@pytest.fixture(scope="module")
def arch(shapes):
    return resolve_architecture(shapes, gpt2_config(D, LAYERS))


@pytest.fixture(scope="module")
def model(shapes):
    m = tiny_gpt2()
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == shapes
    return m


# ------------------------------------------------------------------------------------------------ the reader


def test_reader_returns_the_requested_rows_and_metadata(tmp_path, shapes):
    names = trunk_names()
    arrays = random_stacks(shapes, names, k=4)
    arrays["transformer.wte.weight"] = np.ones((1, *shapes["transformer.wte.weight"]), np.float32)  # not asked for
    meta = {"k": "4", "anchor_step": "10", "group": "trunk"}
    path = save(tmp_path / "v.safetensors", arrays, meta)
    want = {n: shapes[n] for n in names[:3]}

    vf = read_vectors(path, want, rows=2)
    assert set(vf.stacks) == set(want) and vf.k == 2 and vf.switch == {} and vf.metadata == meta
    for n in want:
        assert vf.stacks[n].dtype == torch.float64 and tuple(vf.stacks[n].shape) == (2, *shapes[n])
        np.testing.assert_array_equal(vf.stacks[n].numpy(), arrays[n][:2].astype(np.float64))
    assert read_vectors(path, want).k == 4  # rows=None: every row
    assert read_vectors(path, want, rows=10).k == 4
    # v_b over the tensors read, normalised by hand
    norm = math.sqrt(sum(float((arrays[n][0].astype(np.float64) ** 2).sum()) for n in want))
    unit = vf.backbone(unit=True)
    for n in want:
        np.testing.assert_allclose(unit[n].numpy(), arrays[n][0].astype(np.float64) / norm, rtol=1e-12, atol=0)


def test_unstacked_entries_count_as_k_1(tmp_path, shapes):
    names = trunk_names()
    arrays = {n: a[0] for n, a in random_stacks(shapes, names, k=1).items()}  # [*shape], no k axis
    vf = read_vectors(save(tmp_path / "v.safetensors", arrays), {n: shapes[n] for n in names})
    assert vf.k == 1 and vf.metadata == {}
    for n in names:
        np.testing.assert_array_equal(vf.stacks[n][0].numpy(), arrays[n].astype(np.float64))


def test_only_the_requested_tensors_are_read(tmp_path, shapes):
    """Block 0's entries have a dtype the format knows but torch cannot hold (6-bit floats): reading block 1 never
    touches their bytes. (An unknown dtype code is refused for the whole file: headers are validated entirely.)"""
    b0, b1 = trunk_names([0]), trunk_names([1])
    good = random_stacks(shapes, b1, k=2)
    entries = {n: ("F32", a.shape, a.tobytes()) for n, a in good.items()}
    entries |= {n: ("F6_E2M3", (2, *shapes[n]), b"\0" * (2 * math.prod(shapes[n]) * 6 // 8)) for n in b0}
    path = raw_safetensors(tmp_path / "v.safetensors", entries)
    vf = read_vectors(path, {n: shapes[n] for n in b1})
    for n in b1:
        np.testing.assert_array_equal(vf.stacks[n].numpy(), good[n].astype(np.float64))
    with pytest.raises(CorruptFileError, match="F6_E2M3"):
        read_vectors(path, {n: shapes[n] for n in b0})


# ------------------------------------------------------------------------------------------------ fisher's reader


def test_fisher_directions_equal_hand_normalised_vectors(tmp_path, shapes, arch):
    names = trunk_names()
    arrays = random_stacks(shapes, names, k=3, seed=1)
    switch = {n: a[0] for n, a in random_stacks(shapes, names, k=1, seed=2).items()}
    path = save(tmp_path / "v.safetensors", arrays | {SWITCH_PREFIX + n: s for n, s in switch.items()})

    out = load_vector_file(path, trunk_layout(arch))
    assert set(out) == {"backbone", "pc2", "pc3", "switch"}
    for key, j in (("backbone", 0), ("pc2", 1), ("pc3", 2)):
        ref = normed(manual_flat({n: a[j] for n, a in arrays.items()}))
        assert out[key].dtype == torch.float64
        np.testing.assert_allclose(out[key].numpy(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out["switch"].numpy(), normed(manual_flat(switch)), rtol=1e-12, atol=1e-15)

    # one block: only that block's tensors are needed (the file lacks block 0 here), renormalised on them
    b1 = {n: arrays[n] for n in trunk_names([1])}
    out1 = load_vector_file(save(tmp_path / "b1.safetensors", b1), trunk_layout(arch, block=1))
    assert set(out1) == {"backbone", "pc2", "pc3"}
    np.testing.assert_allclose(out1["backbone"].numpy(), normed(manual_flat({n: a[0] for n, a in b1.items()},
                                                                             layers=[1])), rtol=1e-12, atol=1e-15)


def test_fisher_reader_caps_at_six_pcs(tmp_path, shapes, arch):
    arrays = random_stacks(shapes, trunk_names(), k=8, seed=3)
    out = load_vector_file(save(tmp_path / "v.safetensors", arrays), trunk_layout(arch))
    assert set(out) == {"backbone", "pc2", "pc3", "pc4", "pc5", "pc6"}
    np.testing.assert_allclose(out["pc6"].numpy(), normed(manual_flat({n: a[5] for n, a in arrays.items()})),
                               rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------ resume's reader


def test_resume_reader_accepts_switch_entries(tmp_path, shapes, model):
    """The bug: a file holding ``switch/...`` entries was refused as 'not a parameter of the model'."""
    names = trunk_names()[:5]  # a file may cover only some parameters
    arrays = random_stacks(shapes, names, k=3, seed=4)
    switch = {SWITCH_PREFIX + n: np.ones(shapes[n], np.float32) for n in names}
    path = save(tmp_path / "v.safetensors", arrays | switch, {"k": "3"})
    vec = load_backbone_vector(path, model)
    assert set(vec) == set(names)
    norm = math.sqrt(sum(float((arrays[n][0].astype(np.float64) ** 2).sum()) for n in names))
    for n in names:
        assert vec[n].dtype == torch.float64 and tuple(vec[n].shape) == shapes[n]
        np.testing.assert_allclose(vec[n].numpy(), arrays[n][0].astype(np.float64) / norm, rtol=1e-12, atol=0)
    # [*shape] entries (no k axis) are accepted too
    flat = save(tmp_path / "flat.safetensors", {n: a[0] for n, a in arrays.items()})
    vec2 = load_backbone_vector(flat, model)
    for n in names:
        np.testing.assert_allclose(vec2[n].numpy(), vec[n].numpy(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ a real run's file


def _backbone_vectors_of_a_run(tmp_path, d: int, seed: int, noise: float, k: int):
    """(run, vectors file) of run_backbone over a 7-checkpoint random GPT-2 trajectory."""
    shapes = gpt2_shapes(d, LAYERS)
    steps = [0, 10, 20, 30, 45, 60, 80]
    run = make_run(tmp_path / "run", random_trajectory(shapes, len(steps), seed=seed, noise=noise), steps,
                   gpt2_config(d, LAYERS))
    path = tmp_path / "v.safetensors"
    run_backbone(run, save_vectors=path, top_k_vectors=k)
    return run, path


def test_file_from_run_backbone(tmp_path):
    d = 8
    shapes = gpt2_shapes(d, LAYERS)
    _, path = _backbone_vectors_of_a_run(tmp_path, d, seed=3, noise=0.04, k=3)
    with safe_open(str(path), framework="np") as f:  # the independent reading
        saved = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
        meta = f.metadata()
    blocks = {k[len(BLOCK_PREFIX):]: saved.pop(k) for k in list(saved) if k.startswith(BLOCK_PREFIX)}
    assert set(saved) == set(trunk_names()) == set(blocks) and meta["k"] == "3"

    arch = resolve_architecture(shapes, gpt2_config(d, LAYERS))
    vf = read_vectors(path, {n: shapes[n] for n in saved})
    assert vf.k == 3 and vf.metadata == meta and vf.metadata["anchor_step"] == "0"
    out = load_vector_file(path, trunk_layout(arch))
    assert set(out) == {"backbone", "pc2", "pc3"}
    for key, j in (("backbone", 0), ("pc2", 1), ("pc3", 2)):
        ref = normed(manual_flat({n: a[j] for n, a in saved.items()}, d=d))
        np.testing.assert_allclose(out[key].numpy(), ref, rtol=1e-12, atol=1e-15)

    model = tiny_gpt2(d)
    vec = load_backbone_vector(path, model)
    norm = math.sqrt(sum(float((a[0] ** 2).sum()) for a in saved.values()))
    assert norm == pytest.approx(1.0, abs=1e-5)  # V_1 is a unit vector over the file
    for n, a in saved.items():
        np.testing.assert_allclose(vec[n].numpy(), a[0] / norm, rtol=1e-12, atol=0)

    # the same file with a switching direction added: resume still reads it, fisher gets the switch direction
    sw = {n: torch.from_numpy(np.linspace(-1, 1, a[0].size).reshape(a[0].shape).astype(np.float32))
          for n, a in saved.items()}
    both = tmp_path / "with_switch.safetensors"
    save_file(load_file(str(path)) | {SWITCH_PREFIX + n: t for n, t in sw.items()}, str(both), meta)  # keeps block/
    vec_sw = load_backbone_vector(both, model)
    for n in saved:
        np.testing.assert_allclose(vec_sw[n].numpy(), vec[n].numpy(), rtol=1e-12, atol=0)
    out_sw = load_vector_file(both, trunk_layout(arch))
    np.testing.assert_allclose(out_sw["switch"].numpy(), normed(manual_flat({n: t.numpy() for n, t in sw.items()},
                                                                            d=d)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out_sw["backbone"].numpy(), out["backbone"].numpy(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def readers(shapes, arch, model):
    layout = trunk_layout(arch)
    return {
        "io": lambda p: read_vectors(p, {n: shapes[n] for n in trunk_names()}),
        "fisher": lambda p: load_vector_file(p, layout),
        "resume": lambda p: load_backbone_vector(p, model),
    }


READERS = ["io", "fisher", "resume"]


@pytest.mark.parametrize("reader", READERS)
def test_missing_file(readers, reader, tmp_path):
    with pytest.raises(InputNotFoundError) as e:
        readers[reader](tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value) and e.value.hint == WRITE_HINT
    with pytest.raises(InputNotFoundError):
        readers[reader](tmp_path)  # a directory is not a vectors file


@pytest.mark.parametrize("reader", READERS)
def test_unreadable_safetensors(readers, reader, tmp_path, shapes):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    good = save(tmp_path / "good.safetensors", random_stacks(shapes, trunk_names(), k=2))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    not_json = tmp_path / "not_json.safetensors"
    not_json.write_bytes((5).to_bytes(8, "little") + b"{oops")
    for p in (garbage, empty, truncated, not_json):
        with pytest.raises(CorruptFileError) as e:
            readers[reader](p)
        assert p.name in str(e.value) and "safetensors" in str(e.value), str(e.value)


@pytest.mark.parametrize("reader", READERS)
def test_shape_mismatch_names_the_tensor_and_both_shapes(readers, reader, tmp_path, shapes):
    arrays = random_stacks(shapes, trunk_names(), k=2)
    bad = "transformer.h.1.mlp.c_fc.weight"
    arrays[bad] = np.ones((2, D + 1, 4 * D), np.float32)
    with pytest.raises(CorruptFileError) as e:
        readers[reader](save(tmp_path / "v.safetensors", arrays))
    msg = str(e.value)
    assert bad in msg and str((2, D + 1, 4 * D)) in msg and str((D, 4 * D)) in msg, msg
    assert e.value.hint == SIZE_HINT


def test_switch_entry_of_the_wrong_shape(tmp_path, shapes, arch):
    arrays = random_stacks(shapes, trunk_names(), k=1)
    arrays |= {SWITCH_PREFIX + n: np.ones(shapes[n], np.float32) for n in trunk_names()}
    arrays[SWITCH_PREFIX + "transformer.h.0.attn.c_proj.weight"] = np.ones((D * D,), np.float32)
    with pytest.raises(CorruptFileError, match="switch/transformer.h.0.attn.c_proj.weight") as e:
        load_vector_file(save(tmp_path / "v.safetensors", arrays), trunk_layout(arch))
    assert e.value.hint == SIZE_HINT


@pytest.mark.parametrize("reader", ["io", "fisher"])
def test_missing_needed_tensor(readers, reader, tmp_path, shapes):
    arrays = random_stacks(shapes, trunk_names(), k=2)
    del arrays["transformer.h.0.attn.c_proj.weight"]
    with pytest.raises(CorruptFileError) as e:
        readers[reader](save(tmp_path / "v.safetensors", arrays))
    assert "transformer.h.0.attn.c_proj.weight" in str(e.value) and e.value.hint == ARCH_HINT


def test_resume_refuses_a_tensor_the_model_lacks(tmp_path, shapes, model):
    arrays = random_stacks(shapes, trunk_names(), k=2)
    arrays["transformer.h.7.attn.c_attn.weight"] = np.ones((2, D, 3 * D), np.float32)
    with pytest.raises(CorruptFileError) as e:
        load_backbone_vector(save(tmp_path / "v.safetensors", arrays), model)
    assert "transformer.h.7.attn.c_attn.weight" in str(e.value) and "not a parameter" in str(e.value)
    assert e.value.hint == ARCH_HINT


@pytest.mark.parametrize("reader", READERS)
def test_zero_empty_or_nan_backbone(readers, reader, tmp_path, shapes):
    names = trunk_names()
    zero = random_stacks(shapes, names, k=2)
    for a in zero.values():
        a[0] = 0.0  # V_2 is not zero: only V_1 matters
    nan = random_stacks(shapes, names, k=2)
    nan[names[0]][0, 0, 0] = np.nan
    no_rows = {n: np.zeros((0, *shapes[n]), np.float32) for n in names}
    cases = {"zero": save(tmp_path / "zero.safetensors", zero), "nan": save(tmp_path / "nan.safetensors", nan),
             "k0": save(tmp_path / "k0.safetensors", no_rows)}
    if reader == "resume":  # files with no vector entry at all (resume needs none in particular)
        cases["nothing"] = save(tmp_path / "nothing.safetensors", {"switch/" + names[0]: np.ones(shapes[names[0]],
                                                                                                np.float32)})
        cases["no_keys"] = save(tmp_path / "no_keys.safetensors", {})
    for case, p in cases.items():
        with pytest.raises(CorruptFileError) as e:
            readers[reader](p)
        assert p.name in str(e.value), (case, str(e.value))


def test_partial_switch_direction_is_refused(tmp_path, shapes, arch):
    names = trunk_names()
    arrays = random_stacks(shapes, names, k=1) | {SWITCH_PREFIX + names[0]: np.ones(shapes[names[0]], np.float32)}
    with pytest.raises(CorruptFileError, match="switching direction"):
        load_vector_file(save(tmp_path / "v.safetensors", arrays), trunk_layout(arch))


def test_fisher_block_restriction_that_is_zero(tmp_path, shapes, arch):
    """V_1 non-zero in the file but zero on the analysed block's tensors: refused for that block only."""
    arrays = random_stacks(shapes, trunk_names(), k=1)
    for n in trunk_names([1]):
        arrays[n][:] = 0.0
    path = save(tmp_path / "v.safetensors", arrays)
    load_vector_file(path, trunk_layout(arch, block=0))
    with pytest.raises(CorruptFileError, match="zero"):
        load_vector_file(path, trunk_layout(arch, block=1))


# ------------------------------------------------------------------------------------------------ through the CLI


def test_cli_resume_probe_bad_vectors_is_one_line_exit_2(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoint-20"
    w = load_file(str(ckpt / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    shape = tuple(w[name].shape)
    bad = save(tmp_path / "bad.safetensors", {name: np.ones((2, shape[0] + 1, shape[1]), np.float32)})
    r = invoke("resume-probe", ckpt, "--vectors", bad, "--train-steps", 1, "--no-report", "--device", "cpu")
    assert_one_line_error(r, "bad.safetensors", name, "another model size")
    r = invoke("resume-probe", ckpt, "--vectors", tmp_path / "absent.safetensors", "--train-steps", 1, "--no-report",
             "--device", "cpu")
    assert_one_line_error(r, "absent.safetensors", "ckptaudit backbone --save-vectors")


def test_cli_resume_probe_reads_a_file_with_switch_entries(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoint-20"
    w0, w20 = load_file(str(tiny_run / "checkpoint-0" / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    arrays = {n: torch.stack([w20[n] - w0[n], torch.zeros_like(w0[n])]).numpy() for n in names}
    arrays |= {SWITCH_PREFIX + n: np.ones(tuple(w0[n].shape), np.float32) for n in names}
    vec = save(tmp_path / "v.safetensors", arrays)
    r = invoke("resume-probe", ckpt, "--vectors", vec, "--train-steps", 1, "--lr-mult", "1", "--warmup-steps", 0,
             "--no-boundary-probe", "--no-report", "--device", "cpu", "--json")
    assert r.exit_code == 0, (r.output, r.stderr)
    s = json.loads(r.stdout)
    assert s["settings"]["vectors"] == str(vec)


def test_cli_fisher_bad_vectors_is_one_line_exit_2(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoint-60"
    w = load_file(str(ckpt / "model.safetensors"))
    names = sorted(n for n in w if n.startswith("transformer.h.") and n.endswith(".weight") and w[n].ndim == 2)
    arrays = {n: np.ones((1, *w[n].shape), np.float32) for n in names}
    del arrays["transformer.h.1.mlp.c_proj.weight"]
    bad = save(tmp_path / "bad.safetensors", arrays)
    r = invoke("fisher", ckpt, "--vectors", bad, "--no-report")
    assert_one_line_error(r, "bad.safetensors", "transformer.h.1.mlp.c_proj.weight", "another architecture")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    assert_one_line_error(invoke("fisher", ckpt, "--vectors", garbage, "--no-report"), "garbage.safetensors")


def test_block_backbones_are_each_blocks_own_pc1(tmp_path):
    """block/<tensor> entries: for every block, numpy's SVD of that block's own drift matrix gives V_1 (signed so
    that a(last) > 0), and fisher's probes carry it as v_b^(l) for b_l (the segment dot product itself is checked
    against dense gradients in test_fisher)."""
    from ckptaudit.analyses.fisher.directions import load_block_backbones
    from ckptaudit.analyses.fisher.run import prepare_probes

    d = 8
    shapes = gpt2_shapes(d, LAYERS)
    run, path = _backbone_vectors_of_a_run(tmp_path, d, seed=5, noise=0.05, k=2)
    saved = load_file(str(path))
    parts = reference_parts(d, LAYERS)
    arch = resolve_architecture(shapes, gpt2_config(d, LAYERS))
    layout = trunk_layout(arch)
    own = load_block_backbones(path, layout).numpy()
    for b in range(LAYERS):
        X = stacked(run, parts[f"block_{b}"])
        v = np.linalg.svd(X, full_matrices=False)[2][0]
        v = v if (X[-1] @ v) > 0 else -v
        got = np.concatenate([saved[BLOCK_PREFIX + n].double().numpy()[idx].ravel() for n, idx in parts[f"block_{b}"]])
        np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6)  # stored as float32
        lo, hi = layout.block_ranges[b]
        seg = own[lo:hi]
        assert abs(np.linalg.norm(seg) - 1) < 1e-5
        # b_l is a segment dot product with this vector (normalised on the segment)
        directions = load_vector_file(path, layout)
        probes = prepare_probes(layout, directions, 0, 0, block_backbone=torch.from_numpy(own))
        np.testing.assert_allclose(probes.vb_blocks[lo:hi].numpy(), seg / np.linalg.norm(seg), rtol=1e-12)
    # A file without block entries (written before them): b_l falls back to the trunk v_b restricted per block.
    trunk_only = tmp_path / "trunk_only.safetensors"
    save_file({k: t for k, t in saved.items() if not k.startswith(BLOCK_PREFIX)}, str(trunk_only))
    assert load_block_backbones(trunk_only, layout) is None
