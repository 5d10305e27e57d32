"""ckptaudit.io.discover: every run layout, step ordering, --steps filters and the refusal cases."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptaudit.errors import InputNotFoundError, LayoutError, UsageError
from ckptaudit.io.discover import Checkpoint, Run, discover_run, parse_steps


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16)}


def _hf_checkpoint(root: Path, n: int, global_step: int | None = None, sharded: bool = False) -> Path:
    """A folder shaped like Trainer's checkpoint-N/ (weights, optimizer, scheduler, RNG, state, config)."""
    d = root / f"checkpoint-{n}"
    d.mkdir(parents=True)
    sd = _weights(n)
    if sharded:
        save_file({"w": sd["w"]}, str(d / "model-00001-of-00002.safetensors"))
        save_file({"b": sd["b"]}, str(d / "model-00002-of-00002.safetensors"))
        index = {"metadata": {"total_size": 0}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                                                "b": "model-00002-of-00002.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, str(d / "model.safetensors"))
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, d / "optimizer.pt")
    torch.save({"last_epoch": n}, d / "scheduler.pt")
    torch.save({"python": 1}, d / "rng_state.pth")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": n if global_step is None else global_step,
                                                       "log_history": []}))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return d


def test_hf_trainer_run_sorted_numerically(tmp_path: Path) -> None:
    run_dir = tmp_path / "out"
    for n in (10, 9, 100):
        _hf_checkpoint(run_dir, n, sharded=(n == 100))
    # noise a real output_dir has: logs, tokenizer, args, the final model saved at the top
    (run_dir / "runs").mkdir()
    (run_dir / "runs" / "events.out.tfevents.1").write_bytes(b"\x00\x01binary")
    (run_dir / "README.md").write_text("# model card")
    (run_dir / "tokenizer.json").write_text(json.dumps({"model": {}}))
    torch.save({"x": 1}, run_dir / "training_args.bin")
    save_file(_weights(0), str(run_dir / "model.safetensors"))
    (run_dir / "config.json").write_text("{}")

    run = discover_run(run_dir)
    assert isinstance(run, Run)
    assert run.steps == [9, 10, 100]
    assert len(run) == 3 and [c.step for c in run] == [9, 10, 100]
    c = run.by_step(10)
    assert isinstance(c, Checkpoint)
    assert c.layout == "hf-trainer" and c.path == run_dir / "checkpoint-10"
    assert c.weight_files == (c.path / "model.safetensors",)
    assert c.optimizer_file == c.path / "optimizer.pt"
    assert c.scheduler_file == c.path / "scheduler.pt"
    assert c.trainer_state_file == c.path / "trainer_state.json"
    assert c.rng_files == (c.path / "rng_state.pth",)
    assert c.config() == {"model_type": "gpt2", "n_layer": 1}
    assert c.trainer_state()["global_step"] == 10
    with c.tensors() as src:
        assert torch.equal(src.get("w"), _weights(10)["w"])
    sharded = run[-1]
    assert [f.name for f in sharded.weight_files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with sharded.tensors() as src:
        assert sorted(src.keys()) == ["b", "w"]
        assert torch.equal(src.get("b"), _weights(100)["b"])
    assert run[0:2].steps == [9, 10]
    with pytest.raises(LayoutError, match="no checkpoint at step 11.*9, 10, 100"):
        run.by_step(11)


def test_discovered_runs_and_checkpoints_satisfy_the_protocols_analyses_take(tmp_path: Path) -> None:
    """io.types' Protocols are what analyses and the gate may ask of a run and a checkpoint: a discovered Run and
    Checkpoint have every member; an object that lacks one (here the optimizer file) is not a StoredCheckpoint."""
    from dataclasses import dataclass

    from ckptaudit.io.types import CheckpointLike, RunLike, StoredCheckpoint, checkpoint_path

    for n in (1, 2):
        _hf_checkpoint(tmp_path / "out", n)
    run = discover_run(tmp_path / "out")
    assert isinstance(run, RunLike)
    assert all(isinstance(c, StoredCheckpoint) and isinstance(c, CheckpointLike) for c in run.checkpoints)

    @dataclass(frozen=True)
    class WeightsOnly:  # what a test of a weights-only analysis builds
        step: int
        path: Path

        def tensors(self):
            return run.checkpoints[0].tensors()

        def config(self):
            return None

        def trainer_state(self):
            return None

    w = WeightsOnly(1, tmp_path)
    assert isinstance(w, CheckpointLike) and not isinstance(w, StoredCheckpoint)
    assert checkpoint_path(w) == tmp_path and checkpoint_path(str(tmp_path)) == tmp_path


def test_trainer_state_step_wins_over_folder_name(tmp_path: Path) -> None:
    _hf_checkpoint(tmp_path, 5, global_step=500)
    _hf_checkpoint(tmp_path, 6, global_step=600)
    assert discover_run(tmp_path).steps == [500, 600]


def test_single_checkpoint_dir_and_file_are_runs_of_one(tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path, 40)
    run = discover_run(d)
    assert run.steps == [40] and run[0].layout == "hf-trainer"
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    save_file(_weights(1), str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text('{"a": 1}')
    run = discover_run(str(model_dir))
    assert run.steps == [0] and run[0].layout == "model-dir" and run[0].config() == {"a": 1}
    f = tmp_path / "weights.safetensors"
    save_file(_weights(2), str(f))
    one = discover_run(f)
    assert one.steps == [0] and one[0].layout == "state-dict" and one[0].path == f


def test_accelerate_save_state_folders(tmp_path: Path) -> None:
    for n, name in ((3, "model.safetensors"), (1, "model_0.safetensors")):
        d = tmp_path / "checkpoints" / f"checkpoint_{n}"
        d.mkdir(parents=True)
        save_file(_weights(n), str(d / name))
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.bin")
        torch.save({"last_epoch": 1}, d / "scheduler.bin")
        torch.save({"seed": 1}, d / "random_states_0.pkl")
    run = discover_run(tmp_path)  # the run's checkpoints/ folder is searched
    assert run.steps == [1, 3]
    c = run.by_step(1)
    assert c.layout == "accelerate"
    assert c.weight_files == (c.path / "model_0.safetensors",)
    assert c.optimizer_file == c.path / "optimizer.bin" and c.scheduler_file == c.path / "scheduler.bin"
    assert c.rng_files == (c.path / "random_states_0.pkl",)
    with c.tensors() as src:
        assert torch.equal(src.get("w"), _weights(1)["w"])


def test_accelerate_folder_without_step_is_left_out_and_listed(tmp_path: Path) -> None:
    for name in ("checkpoint_2", "final"):
        d = tmp_path / name
        d.mkdir()
        save_file(_weights(0), str(d / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.bin")
    run = discover_run(tmp_path)
    assert run.steps == [2]
    assert [(Path(p).name, "no training step" in why) for p, why in run.left_out] == [("final", True)]
    for name in ("final", "best"):  # no step anywhere: refused, nothing guessed
        d = tmp_path / "only" / name
        d.mkdir(parents=True)
        save_file(_weights(0), str(d / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.bin")
    with pytest.raises(LayoutError, match="cannot tell the step of best, final"):
        discover_run(tmp_path / "only")


def test_lightning_ckpts(tmp_path: Path) -> None:
    def save(name: str, step: int) -> None:
        torch.save({"epoch": 0, "global_step": step, "state_dict": {"net.w": torch.full((2,), float(step))},
                    "optimizer_states": [], "lr_schedulers": []}, tmp_path / name)

    save("epoch=0-step=50.ckpt", 50)
    save("epoch=1-step=100.ckpt", 100)
    save("last.ckpt", 100)  # Lightning's copy of the newest: dropped as a duplicate
    save("mid.ckpt", 75)  # no step in the name: read from the file
    run = discover_run(tmp_path)
    assert run.steps == [50, 75, 100]
    c = run.by_step(100)
    assert c.layout == "lightning" and c.path.name == "epoch=1-step=100.ckpt"
    assert c.optimizer_file == c.path and c.weight_files == (c.path,)
    with run.by_step(75).tensors() as src:
        assert torch.equal(src.get("net.w"), torch.full((2,), 75.0))


def test_loose_state_dict_files(tmp_path: Path) -> None:
    torch.save(_weights(1), tmp_path / "step_100.pt")
    save_file(_weights(2), str(tmp_path / "step-20.safetensors"))
    torch.save({"model": _weights(3)}, tmp_path / "ckpt_3.bin")
    torch.save({"model": _weights(4)}, tmp_path / "weights_7.pth")  # trailing integer
    (tmp_path / "train.log").write_text("loss 1.0\n")
    (tmp_path / "config.json").write_text('{"d": 3}')
    run = discover_run(tmp_path)
    assert run.steps == [3, 7, 20, 100]
    assert {c.layout for c in run} == {"state-dict"}
    assert run.by_step(3).config() == {"d": 3}
    with run.by_step(3).tensors() as src:
        assert torch.equal(src.get("w"), _weights(3)["w"])


def test_step_named_directories(tmp_path: Path) -> None:
    for name in ("step_200", "step-30", "ckpt_4", "ckpt-1000"):
        d = tmp_path / name
        d.mkdir()
        save_file(_weights(0), str(d / "model.safetensors"))
    run = discover_run(tmp_path)
    assert run.steps == [4, 30, 200, 1000]
    assert {c.layout for c in run} == {"model-dir"}


def test_gguf_files(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    for step in (5, 1):
        w = gguf.GGUFWriter(str(tmp_path / f"model-step{step}.gguf"), "llama")
        w.add_tensor("t", np.full((2, 32), step, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    run = discover_run(tmp_path)
    assert run.steps == [1, 5] and {c.layout for c in run} == {"gguf"}
    with run.by_step(5).tensors() as src:
        assert torch.equal(src.get("t"), torch.full((2, 32), 5.0))


def test_dcp_folders(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    for step in (20, 10):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": _weights(step)}, checkpoint_id=str(tmp_path / f"step_{step}"), no_dist=True)
    run = discover_run(tmp_path)
    assert run.steps == [10, 20] and {c.layout for c in run} == {"dcp"}
    assert all(f.suffix == ".distcp" for f in run[0].weight_files)
    with run.by_step(20).tensors() as src:
        assert sorted(src.keys()) == ["b", "w"]
        assert torch.equal(src.get("w"), _weights(20)["w"])


# ------------------------------------------------------------------------------------------ refusals


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope"):
        discover_run(tmp_path / "nope")


def test_empty_run_lists_what_was_seen(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "logs").mkdir()
    with pytest.raises(LayoutError, match=r"no checkpoints found.*README\.md.*logs/"):
        discover_run(tmp_path)


def test_duplicate_steps_are_ambiguous(tmp_path: Path) -> None:
    torch.save(_weights(1), tmp_path / "step_100.pt")
    save_file(_weights(2), str(tmp_path / "step-100.safetensors"))
    with pytest.raises(LayoutError, match=r"step 100.*step-100\.safetensors.*step_100\.pt"):
        discover_run(tmp_path)


def test_undeterminable_step_is_left_out_not_guessed(tmp_path: Path) -> None:
    torch.save(_weights(1), tmp_path / "step_100.pt")
    save_file(_weights(2), str(tmp_path / "final.safetensors"))
    run = discover_run(tmp_path)
    assert run.steps == [100] and [Path(p).name for p, _ in run.left_out] == ["final.safetensors"]


def test_unreadable_trainer_state(tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path, 1)
    (d / "trainer_state.json").write_text("{not json")
    from ckptaudit.errors import CorruptFileError

    with pytest.raises(CorruptFileError, match="trainer_state.json"):
        discover_run(tmp_path)


# ------------------------------------------------------------------------------------------ --steps


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for s in (0, 100, 200, 300, 500, 1000):
        torch.save({"w": torch.tensor([float(s)])}, tmp_path / f"step_{s}.pt")
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("100,500", [100, 500]),
        ("500, 100", [100, 500]),
        ("100:500", [100, 200, 300, 500]),
        ("150:", [200, 300, 500, 1000]),
        (":200", [0, 100, 200]),
        ("0:1000:200", [0, 200, 1000]),
        ("100:1000:200", [100, 300, 500]),
        ("100::400", [100, 500]),
        ("::2", [0, 200, 500]),
        ("::4", [0, 500]),
        ("-1", [1000]),
        ("last", [1000]),
        ("first", [0]),
        ("first,-2", [0, 500]),
    ],
)
def test_steps_filter(run_dir: Path, spec: str, expected: list[int]) -> None:
    run = discover_run(run_dir, steps=spec)
    assert run.steps == expected
    for c in run:  # the filtered checkpoints are the right files
        with c.tensors() as src:
            assert src.get("w").item() == float(c.step)


@pytest.mark.parametrize("spec", ["150", "100,150", "-7", "600:900"])
def test_steps_selecting_absent_steps(run_dir: Path, spec: str) -> None:
    with pytest.raises(LayoutError, match=r"0, 100, 200, 300, 500, 1000"):
        discover_run(run_dir, steps=spec)


@pytest.mark.parametrize("spec", ["", "abc", "1:2:3:4", "::0", ":10:2", "500:100", "1.5"])
def test_malformed_steps_spec(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_steps(spec)


def test_one_step_list_format_and_one_anchor_check() -> None:
    """Every message that lists steps uses io.steps.format_steps; --anchor is checked by io.steps.anchor_index for
    both the backbone analysis and the drift-run loader."""
    from ckptaudit.io.steps import anchor_index, format_steps

    assert format_steps([]) == "none"
    assert format_steps([0, 10, 20]) == "0, 10, 20"
    many = list(range(0, 250, 10))  # 25 steps: the first and last 10 around "..."
    assert format_steps(many) == ", ".join(map(str, many[:10])) + ", ..., " + ", ".join(map(str, many[-10:]))
    assert format_steps(many, limit=4) == "0, 10, ..., 230, 240"
    steps = [0, 100, 200]
    assert anchor_index(steps, None) == 0 and anchor_index(steps, 200) == 2
    with pytest.raises(UsageError, match=r"--anchor 150: no checkpoint at that step") as e:
        anchor_index(steps, 150)
    assert e.value.hint == "steps in the run: 0, 100, 200"


def test_file_safety_says_when_a_pickle_needs_allow_listed_globals(tmp_path):
    """A plain tensor pickle loads with weights_only as is; a numpy RNG state (as the Trainer saves) is safe but
    needs numpy globals allow-listed; torch.load itself is the reference for both."""
    import numpy as np

    from ckptaudit.analyses.inspect import file_safety

    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    torch.save({"numpy": np.random.RandomState(0).get_state()}, tmp_path / "rng_state.pth")
    torch.load(tmp_path / "plain.pt", weights_only=True)
    with pytest.raises(Exception, match="(?i)weights.only"):
        torch.load(tmp_path / "rng_state.pth", weights_only=True)
    plain, rng = file_safety(tmp_path / "plain.pt"), file_safety(tmp_path / "rng_state.pth")
    assert plain.safe and plain.detail == "weights-only loadable"
    assert rng.safe and "allow-listed" in rng.detail and "numpy" in rng.detail
