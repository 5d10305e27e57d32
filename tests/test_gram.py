"""Streaming Gram engine against explicitly stacked drift matrices (numpy), on real safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from runs import FakeRun, gpt2_config, gpt2_shapes, make_run, random_trajectory, write_checkpoints
from safetensors.torch import load_file, save_file

from ckptaudit.analyses.backbone.gram import (
    balanced_shards,
    drift_grams,
    sum_grams,
    tensor_names_of,
)
from ckptaudit.errors import LayoutError
from ckptaudit.io.roles import resolve_architecture
from ckptaudit.io.tensors import open_tensors
from ckptaudit.io.writer import SafetensorsStreamWriter

# ------------------------------------------------------------------------------------------------ references


def reference_parts(d: int, n_layers: int, blocks=None) -> dict[str, list[tuple[str, tuple]]]:
    """Independent description of the groups (tensor, numpy index) from the GPT-2 layout of SPEC section 0."""
    groups: dict[str, list] = {"trunk": [], "group_G": [], "group_S": []}
    every = slice(None)
    for layer in range(n_layers):
        p = f"transformer.h.{layer}."
        parts = [(p + "attn.c_attn.weight", (every, slice(0, d)), "G"), (p + "attn.c_attn.weight", (every, slice(d, 2 * d)), "G"),
                 (p + "attn.c_attn.weight", (every, slice(2 * d, 3 * d)), "S"), (p + "attn.c_proj.weight", (every,), "S"),
                 (p + "mlp.c_fc.weight", (every,), "S"), (p + "mlp.c_proj.weight", (every,), "S")]
        groups[f"block_{layer}"] = []
        for name, idx, g in parts:
            groups["trunk"].append((name, idx))
            groups[f"block_{layer}"].append((name, idx))
            groups[f"group_{g}"].append((name, idx))
    return groups


def stacked(run: FakeRun, parts: list[tuple[str, tuple]], anchor_idx: int = 0, rows=None) -> np.ndarray:
    """The explicit drift matrix X [T, D] (float64 of the stored values), rows = checkpoints after the anchor."""
    def vec(ck):
        with open_tensors(ck.path) as src:
            return np.concatenate([src.get(n).to(torch.float64).numpy()[idx].ravel() for n, idx in parts])
    base = vec(run.checkpoints[anchor_idx])
    rows = run.checkpoints[anchor_idx + 1 :] if rows is None else rows
    return np.stack([vec(c) - base for c in rows])


def arch_groups(run: FakeRun, blocks=None) -> dict[str, list]:
    from ckptaudit.analyses.backbone.run import backbone_groups

    c0 = run.checkpoints[0]
    with c0.tensors() as src:
        shapes = {n: src.shape(n) for n in src.keys()}
    return backbone_groups(resolve_architecture(shapes, c0.config()), blocks)


# ---------------------------------------------------------------------------------------------------- tests

D_MODEL, LAYERS = 8, 2


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> FakeRun:
    shapes = gpt2_shapes(D_MODEL, LAYERS)
    steps = [0, 10, 20, 30, 45, 60, 80]
    return make_run(tmp_path_factory.mktemp("gram"), random_trajectory(shapes, len(steps)), steps,
                    gpt2_config(D_MODEL, LAYERS))


def test_grams_match_stacked_numpy(small_run):
    groups = arch_groups(small_run)
    ref = reference_parts(D_MODEL, LAYERS)
    calls, totals = [], []
    gs = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, progress=calls.append,
                     progress_total=totals.append)
    assert set(gs.grams) == set(ref)
    for name, parts in ref.items():
        X = stacked(small_run, parts)
        np.testing.assert_allclose(gs.grams[name], X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(X @ X.T).max())
        assert gs.dims[name] == X.shape[1]
    # progress unit: one stored tensor of one checkpoint (anchor included); the total is announced first
    n_units = len(tensor_names_of(groups)) * len(small_run.checkpoints)
    assert totals == [n_units] and sum(calls) == pytest.approx(n_units)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_smaller_than_tensor_gives_same_gram(small_run, chunk):
    groups = arch_groups(small_run)
    full = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, chunk_elems=1 << 20)
    part = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, chunk_elems=chunk)
    for k in full.grams:
        np.testing.assert_allclose(part.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())


def test_partial_grams_over_disjoint_tensors_sum_to_full(small_run):
    groups = arch_groups(small_run)
    names = tensor_names_of(groups)
    full = drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups)
    with small_run.checkpoints[0].tensors() as src:
        sizes = {n: src.numel(n) for n in names}
    shards = balanced_shards(names, sizes, 3)  # how the ranks of a distributed run split the tensors
    assert all(shards)
    parts = [drift_grams(small_run.checkpoints[1:], small_run.checkpoints[0], groups, tensor_names=shard)
             for shard in shards]
    assert sorted(n for p in parts for n in p.tensor_names) == sorted(names)
    total = sum_grams(parts)
    added = parts[0] + parts[1] + parts[2]
    for k in full.grams:
        np.testing.assert_allclose(total.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())
        np.testing.assert_allclose(added.grams[k], full.grams[k], rtol=1e-12, atol=1e-12 * np.abs(full.grams[k]).max())
        assert total.dims[k] == full.dims[k]


def test_anchor_in_rows_gives_zero_row_and_open_sources(small_run):
    groups = {"trunk": arch_groups(small_run)["trunk"]}
    srcs = [c.tensors() for c in small_run.checkpoints]  # already-open TensorSources are accepted too
    gs = drift_grams(srcs, srcs[2], groups)
    G = gs.grams["trunk"]
    assert np.all(G[2] == 0) and np.all(G[:, 2] == 0)
    X = stacked(small_run, reference_parts(D_MODEL, LAYERS)["trunk"], anchor_idx=2, rows=small_run.checkpoints)
    np.testing.assert_allclose(G, X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(G).max())


def test_bf16_and_sharded_checkpoints(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    steps = [0, 5, 9, 14]
    run = make_run(tmp_path, random_trajectory(shapes, len(steps), seed=3), steps, gpt2_config(D_MODEL, 1),
                   dtype=torch.bfloat16, shards=3)
    with run.checkpoints[0].tensors() as src:
        assert src.format == "safetensors-index" and src.dtype("transformer.h.0.mlp.c_fc.weight") == torch.bfloat16
    groups = arch_groups(run)
    gs = drift_grams(run.checkpoints[1:], run.checkpoints[0], groups, chunk_elems=50)
    for name, parts in reference_parts(D_MODEL, 1).items():
        X = stacked(run, parts)  # the bf16 values upcast
        np.testing.assert_allclose(gs.grams[name], X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(X @ X.T).max())


def test_mismatched_shapes_are_a_layout_error(tmp_path):
    shapes = gpt2_shapes(D_MODEL, 1)
    thetas = random_trajectory(shapes, 3)
    thetas[2]["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(D_MODEL, 2 * D_MODEL)
    thetas[2]["transformer.h.0.mlp.c_proj.weight"] = torch.zeros(2 * D_MODEL, D_MODEL)
    run = make_run(tmp_path, thetas, [0, 1, 2], gpt2_config(D_MODEL, 1))
    with pytest.raises(LayoutError, match="checkpoint 2"):
        drift_grams(run.checkpoints[1:], run.checkpoints[0], arch_groups(FakeRun(tmp_path, run.checkpoints[:1])))


def test_stream_writer_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"b.weight": torch.randn(2, 3, 5, generator=g), "a": torch.randn(7, generator=g),
               "empty": torch.zeros(0, 4)}
    w = SafetensorsStreamWriter(tmp_path / "v.safetensors", {k: (tuple(v.shape), torch.float32) for k, v in tensors.items()},
                                {"k": "2"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "v.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    w2 = SafetensorsStreamWriter(tmp_path / "x.safetensors", {"a": ((2,), torch.float32)})
    with pytest.raises(ValueError):
        w2.write("b", torch.zeros(2))
    w2.abort()
    assert not any(tmp_path.glob("*x.safetensors*"))


# --------------------------------------------------------------------------------- ranged reads and chunk layout


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8),
                                                                     y.contiguous().view(torch.uint8))


def test_read_flat_matches_get_for_every_format(tmp_path):
    """read_flat(name, a, b) == get(name).reshape(-1)[a:b], bit for bit (bf16 included), with and without out=."""
    g = torch.Generator().manual_seed(5)
    sd = {"w": torch.randn(6, 7, generator=g), "h": torch.randn(3, 5, generator=g).to(torch.bfloat16),
          "d": torch.randn(11, generator=g).to(torch.float64), "s": torch.tensor(2.5)}
    save_file(sd, str(tmp_path / "one.safetensors"))
    torch.save(sd, tmp_path / "one.pt")
    write_checkpoints(tmp_path / "sh", [sd], [0], {}, dtype=torch.float32, shards=2)
    sharded = tmp_path / "sh" / "checkpoint-0"
    for path, ranged in [(tmp_path / "one.safetensors", True), (sharded, True), (tmp_path / "one.pt", False)]:
        with open_tensors(path) as src:
            assert src.ranged_reads is ranged
            for name in src.keys():
                ref = src.get(name).reshape(-1)
                n = ref.numel()
                for a, b in [(0, n), (1, max(1, n - 2)), (n - 1, n), (3 % n, 3 % n)]:
                    got = src.read_flat(name, a, b)
                    assert got.dtype == ref.dtype and _same_bits(got, ref[a:b])
                    buf = torch.full((n + 3,), 7, dtype=ref.dtype)
                    into = src.read_flat(name, a, b, out=buf)
                    assert _same_bits(into, ref[a:b]) and _same_bits(buf[b - a:], torch.full((n + 3 - b + a,), 7, dtype=ref.dtype))
                    if b > a:
                        assert into.data_ptr() == buf.data_ptr()
                with pytest.raises(ValueError):
                    src.read_flat(name, 0, n + 1)
                with pytest.raises(ValueError):
                    src.read_flat(name, 0, n, out=torch.empty(n, dtype=torch.int8))


def test_safetensors_reads_are_not_memory_mapped(tmp_path):
    """get() and read_flat() of safetensors use positioned reads: the file never shows up in /proc/self/maps."""
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(f))
    with open_tensors(f) as src:
        assert torch.equal(src.get("w"), torch.arange(4096, dtype=torch.float32).reshape(64, 64))
        assert torch.equal(src.read_flat("w", 100, 200), torch.arange(100, 200, dtype=torch.float32))
        maps = Path("/proc/self/maps")
        if maps.exists():
            assert str(f) not in maps.read_text()


def test_overlapping_pieces_and_whole_tensors(tmp_path):
    """Pieces that overlap (whole tensor + a column block + a row block) and a 1-D tensor, any chunk size,
    on the numpy path and on the torch path (what CUDA runs), against explicit numpy products."""
    from ckptaudit.io.roles import _piece

    g = torch.Generator().manual_seed(9)
    thetas = [{"a": torch.randn(5, 12, generator=g), "b": torch.randn(17, generator=g)} for _ in range(5)]
    run = make_run(tmp_path, thetas, [0, 1, 2, 3, 4], {})
    pa_whole = _piece("a", 0, "q", False, (5, 12))
    pa_cols = _piece("a", 0, "k", False, (5, 12), index=((1, 3, 9),))
    pa_rows = _piece("a", 0, "v", False, (5, 12), index=((0, 1, 4),))
    pa_head = _piece("a", 0, "o", False, (5, 12), view=(5, 3, 4), index=((1, 2),))  # every 3rd run of 4 columns
    pb = _piece("b", None, "mlp_in", False, (17,))
    groups = {"all": [pa_whole, pb], "cols": [pa_cols], "rows": [pa_rows, pb], "head": [pa_head],
              "mix": [pa_cols, pa_head]}
    base = {k: v.double().numpy() for k, v in thetas[0].items()}
    X = {k: np.stack([t[k].double().numpy() - base[k] for t in thetas[1:]]) for k in base}
    refs = {
        "all": np.concatenate([X["a"].reshape(4, -1), X["b"]], axis=1),
        "cols": X["a"][:, :, 3:9].reshape(4, -1),
        "rows": np.concatenate([X["a"][:, 1:4, :].reshape(4, -1), X["b"]], axis=1),
        "head": X["a"].reshape(4, 5, 3, 4)[:, :, 2, :].reshape(4, -1),
    }
    refs["mix"] = np.concatenate([refs["cols"], refs["head"]], axis=1)
    for backend in ("numpy", "torch"):
        for chunk in (1, 5, 7, 12, 13, 1000):
            gs = drift_grams(run.checkpoints[1:], run.checkpoints[0], groups, chunk_elems=chunk, _backend=backend)
            for k, R in refs.items():
                np.testing.assert_allclose(gs.grams[k], R @ R.T, rtol=1e-12, atol=1e-13, err_msg=f"{backend} {chunk} {k}")
                assert gs.dims[k] == R.shape[1]
                assert np.array_equal(gs.grams[k], gs.grams[k].T)


def test_threads_and_prefetch_do_not_change_the_gram(small_run):
    """The products are added in chunk order whatever the thread count: results are bit-identical."""
    groups = arch_groups(small_run)
    rows, anchor = small_run.checkpoints[1:], small_run.checkpoints[0]
    ref = drift_grams(rows, anchor, groups, chunk_elems=37, prefetch=False)
    for kw in ({"threads": 1}, {"threads": 3}, {"threads": 2, "prefetch": True}):
        gs = drift_grams(rows, anchor, groups, chunk_elems=37, **kw)
        for k in ref.grams:
            assert np.array_equal(gs.grams[k], ref.grams[k]), (kw, k)


def test_balanced_shards_and_exact_piece_reduction(small_run):
    """Size-balanced split is a partition; summing per-piece Grams of the parts then combining reproduces the
    single pass exactly (what the distributed all-reduce does)."""
    from ckptaudit.analyses.backbone.gram import PieceGrams, balanced_shards

    groups = arch_groups(small_run)
    names = tensor_names_of(groups)
    with small_run.checkpoints[0].tensors() as src:
        sizes = {n: src.nbytes(n) for n in names}
    shards = balanced_shards(names, sizes, 3)
    assert sorted(n for s in shards for n in s) == sorted(names) and all(shards)
    loads = [sum(sizes[n] for n in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert balanced_shards(names, sizes, 1) == [names]
    rows, anchor = small_run.checkpoints[1:], small_run.checkpoints[0]
    full = drift_grams(rows, anchor, groups)
    parts = [drift_grams(rows, anchor, groups, tensor_names=s) for s in shards]
    pg = parts[0].pieces
    summed = PieceGrams(np.sum([p.pieces.grams for p in parts], axis=0),
                        np.any([p.pieces.done for p in parts], axis=0), pg.members, pg.numel, pg.group_names)
    combined = summed.combine(names)
    for k in full.grams:
        assert np.array_equal(combined.grams[k], full.grams[k]) and combined.dims[k] == full.dims[k]


@pytest.mark.slow
def test_flat_memory_on_many_checkpoints(tmp_path):
    """Peak RSS while streaming 30 checkpoints of a 6 MB tensor stays near T x chunk, far below T x tensor."""
    import subprocess
    import sys

    code = f'''
import resource, sys, torch, numpy as np
from safetensors.torch import save_file
from pathlib import Path
root = Path({str(tmp_path)!r})
g = torch.Generator().manual_seed(0)
w = torch.randn(1536, 1024, generator=g)
for i in range(31):
    save_file({{"w": w + 1e-3 * i}}, str(root / f"c{{i}}.safetensors"))
del w
from ckptaudit.analyses.backbone.gram import drift_grams
from ckptaudit.io.roles import _piece
from ckptaudit.io.tensors import open_tensors
srcs = [open_tensors(root / f"c{{i}}.safetensors") for i in range(31)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gs = drift_grams(srcs[1:], srcs[0], {{"w": [_piece("w", 0, "q", False, (1536, 1024))]}}, chunk_elems=16384)
grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(grow, float(gs.grams["w"][0, 0]))
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grow_mb, g00 = float(out[0]), float(out[1])
    assert g00 == pytest.approx(1536 * 1024 * 1e-6, rel=1e-3)
    assert grow_mb < 60, f"peak RSS grew by {grow_mb:.0f} MB (30 checkpoints x 6 MB would be 180 MB)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_widens_half_precision_rows_exactly(tmp_path, dtype):
    """The device path (one transfer per chunk, widened to float64 there) against numpy on the stored values."""
    shapes = gpt2_shapes(D_MODEL, 1)
    steps = [0, 10, 20, 30, 40]
    run = make_run(tmp_path, random_trajectory(shapes, len(steps), seed=4), steps, gpt2_config(D_MODEL, 1), dtype=dtype)
    groups = arch_groups(run)
    ref = reference_parts(D_MODEL, 1)
    for chunk in (16, 100, 1 << 20):  # whole-block chunks, ragged last chunks, one chunk per tensor
        gs = drift_grams(run.checkpoints[1:], run.checkpoints[0], groups, chunk_elems=chunk, _backend="torch")
        for name in ("trunk", "block_0"):
            X = stacked(run, ref[name])
            np.testing.assert_allclose(gs.grams[name], X @ X.T, rtol=1e-12, atol=1e-12 * np.abs(X @ X.T).max())
