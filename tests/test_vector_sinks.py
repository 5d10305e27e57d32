"""Vector sinks of the backbone's vectors pass: the in-memory sink holds exactly the tensors and metadata the
safetensors file holds (read back with safetensors itself), the file sink writes nothing half-way, and the fisher
directions read from either are the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_gram import gpt2_config, gpt2_shapes, make_run, random_trajectory
from test_vectors import LAYERS

from ckptaudit.analyses.backbone.run import BackboneSettings, run_backbone
from ckptaudit.analyses.fisher.directions import read_directions, trunk_layout
from ckptaudit.errors import InputNotFoundError
from ckptaudit.io.roles import resolve_architecture
from ckptaudit.io.vectors import MemoryVectorSink, SafetensorsVectorSink


def _run(tmp_path, d=8):
    shapes = gpt2_shapes(d, LAYERS)
    steps = [0, 10, 20, 30, 45, 60, 80]
    return make_run(tmp_path / "run", random_trajectory(shapes, len(steps), seed=5, noise=0.05), steps,
                    gpt2_config(d, LAYERS)), shapes


def test_memory_sink_holds_the_file_entries(tmp_path):
    run, shapes = _run(tmp_path)
    path = tmp_path / "v.safetensors"
    settings = BackboneSettings(top_k_vectors=3, window=3)
    on_disk = run_backbone(run, settings, save_vectors=path)
    sink = MemoryVectorSink()
    in_memory = run_backbone(run, settings, save_vectors=sink)
    with safe_open(str(path), framework="pt") as f:  # the independent reading
        saved = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert sorted(sink.tensors) == sorted(saved) and sink.metadata == meta
    for k, t in saved.items():
        assert sink.tensors[k].dtype == t.dtype == torch.float32
        assert torch.equal(sink.tensors[k], t), k
    assert on_disk.vectors_path == str(path) and in_memory.vectors_path is None
    assert on_disk.vector_sigma == in_memory.vector_sigma and len(in_memory.vector_sigma) == 3
    np.testing.assert_array_equal(on_disk.trunk.sigma, in_memory.trunk.sigma)

    layout = trunk_layout(resolve_architecture(shapes, gpt2_config(8, LAYERS)))
    from_file, blocks_file = read_directions(path, layout)
    from_memory, blocks_memory = read_directions(sink, layout)
    assert list(from_file) == list(from_memory) == ["backbone", "pc2", "pc3"]
    for n in from_file:
        assert torch.equal(from_file[n], from_memory[n]), n
    assert torch.equal(blocks_file, blocks_memory)


def test_an_unfilled_memory_sink_is_refused_and_a_failed_file_leaves_nothing(tmp_path):
    run, shapes = _run(tmp_path)
    layout = trunk_layout(resolve_architecture(shapes, gpt2_config(8, LAYERS)))
    with pytest.raises(InputNotFoundError, match="no vectors were written"):
        read_directions(MemoryVectorSink(), layout)
    sink = SafetensorsVectorSink(tmp_path / "out" / "v.safetensors")
    sink.begin({"a": ((2,), torch.float32), "b": ((3,), torch.float32)}, {"k": "1"})
    sink.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="expected b"):
        sink.write("a", torch.ones(2))
    sink.abort()
    assert list((tmp_path / "out").iterdir()) == []
