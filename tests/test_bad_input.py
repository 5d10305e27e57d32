"""Malformed, untrusted input gives a one-line CkptAuditError (exit 2 from the CLI), never a traceback.

Each case goes through the public function, and a selection through the CLI (typer's CliRunner).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import assert_one_line_error, invoke
from conftest import make_tiny_lm_dir

from ckptaudit.errors import CorruptFileError, DataError, LayoutError, UsageError

VOCAB = {f"w{i}": i for i in range(20)} | {"[UNK]": 20, "[EOS]": 21}




def _model_dir(path: Path, tokenizer: bool = True) -> Path:
    return make_tiny_lm_dir(path, VOCAB, unk="[UNK]", eos="[EOS]", n_embd=8, n_layer=1, n_head=2, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("model"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ 1. tasks


@pytest.mark.parametrize(
    "params, key",
    [({"p": "x"}, "p"), ({"p": None}, "p"), ({"train_frac": "a"}, "train_frac"), ({"p": 1}, "p"),
     ({"train_frac": 2.0}, "train_frac")],
)
def test_get_task_rejected_values_name_task_and_parameter(params, key):
    from ckptaudit.tasks import get_task

    with pytest.raises(DataError) as err:
        get_task("modadd", **params)
    msg = str(err.value)
    assert "'modadd'" in msg and f"{key}=" in msg and "\n" not in msg


def test_get_task_unknown_name_and_parameter():
    from ckptaudit.tasks import get_task

    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        get_task("nope")
    with pytest.raises(DataError, match="does not take parameter"):
        get_task("modadd", q=3)


def test_task_spec_file_bad_values(tmp_path):
    from ckptaudit.tasks import TASK_FILE, load_task_spec, task_from_checkpoint_dir

    (tmp_path / TASK_FILE).write_text(json.dumps({"task": "modadd", "p": 1}))
    with pytest.raises(DataError) as err:
        task_from_checkpoint_dir(tmp_path)
    assert TASK_FILE in str(err.value) and "p=1" in str(err.value)

    (tmp_path / TASK_FILE).write_bytes(b'{"task": "modadd", "p": "\xff\xfe"}')
    with pytest.raises(DataError, match="not UTF-8"):
        load_task_spec(tmp_path)

    for doc in ("[1, 2]", '"modadd"', "null", "7"):
        (tmp_path / TASK_FILE).write_text(doc)
        with pytest.raises(DataError, match=f"{TASK_FILE} must hold a JSON object"):
            load_task_spec(tmp_path)

    (tmp_path / TASK_FILE).write_text(json.dumps({"task": ["modadd"]}))
    with pytest.raises(DataError, match="'task'"):
        task_from_checkpoint_dir(tmp_path)


def test_load_data_bad_task_parameters(tiny_checkpoint, tmp_path):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks import TASK_FILE
    from ckptaudit.tasks.data import load_data

    ckpt = discover_run(tiny_checkpoint)[0]
    for spec, key in (('modadd:p="x"', "p="), ("modadd:p=null", "p="), ('modadd:train_frac="a"', "train_frac=")):
        with pytest.raises(DataError) as err:
            load_data(ckpt, task=spec)
        assert "'modadd'" in str(err.value) and key in str(err.value)
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        load_data(ckpt, task="nope")

    bad = _copy(tiny_checkpoint, tmp_path / "checkpoint-60")
    _edit_json(bad / TASK_FILE, p=1)
    with pytest.raises(DataError) as err:
        load_data(discover_run(bad)[0])
    assert TASK_FILE in str(err.value) and "p=1" in str(err.value)


@pytest.mark.parametrize("spec, key", [('modadd:p="x"', "p="), ("modadd:p=null", "p="),
                                       ('modadd:train_frac="a"', "train_frac=")])
def test_cli_bad_task_parameter(tiny_run, spec, key):
    assert_one_line_error(invoke("regimes", tiny_run, "--task", spec), "modadd", key)


def test_cli_task_file_with_bad_value(tiny_run, tmp_path):
    from ckptaudit.tasks import TASK_FILE

    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-0", "checkpoint-10"):
        _copy(tiny_run / name, run / name)
        _edit_json(run / name / TASK_FILE, p=1)
    assert_one_line_error(invoke("regimes", run), TASK_FILE, "p=1")


# ------------------------------------------------------------------------------------------ 2. lr history


@pytest.mark.parametrize(
    "history, expected",
    [
        (None, []),
        ("oops", []),
        ([{"step": 1, "learning_rate": None}, {"step": 2, "learning_rate": 0.5}], [(2, 0.5)]),
        ([{"step": "one", "learning_rate": 0.1}, {"step": None, "learning_rate": 0.1}, {"step": 3,
          "learning_rate": 0.25}], [(3, 0.25)]),
        ([{"step": 4, "learning_rate": "fast"}, 7, None, {"step": 5, "learning_rate": 1e-3}], [(5, 1e-3)]),
    ],
)
def test_lr_history_skips_malformed_entries(history, expected):
    from ckptaudit.io.optimizer import lr_history

    ckpt = SimpleNamespace(trainer_state=lambda: {"log_history": history})
    assert lr_history(ckpt) == expected


def test_lr_history_non_object_state():
    from ckptaudit.io.optimizer import lr_history

    assert lr_history(SimpleNamespace(trainer_state=lambda: [1, 2])) == []


def test_cli_inspect_with_malformed_lr_history(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ck = _copy(tiny_checkpoint, run / "checkpoint-60")
    state = json.loads((ck / "trainer_state.json").read_text())
    state["log_history"] = [{"step": 1, "learning_rate": None}, {"step": "x", "learning_rate": 0.1}]
    (ck / "trainer_state.json").write_text(json.dumps(state))
    result = invoke("inspect", run, "--no-report")
    assert "Traceback" not in result.output
    assert result.exit_code == 0, (result.output, result.exception)


# ------------------------------------------------------------------------------------------ 3. sharded index


@pytest.mark.parametrize("weight_map", [["model.safetensors"], "model.safetensors", 3])
def test_index_weight_map_not_an_object(model_dir, tmp_path, weight_map):
    from ckptaudit.io.tensors import find_weights

    d = _copy(model_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors\.index\.json.*weight_map"):
        find_weights(d)


def test_cli_index_weight_map_not_an_object(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert_one_line_error(invoke("inspect", d), "model.safetensors.index.json", "weight_map")


# ------------------------------------------------------------------------------------------ 4. role maps


def test_role_map_not_utf8(tmp_path):
    from ckptaudit.io.roles import load_role_map

    f = tmp_path / "roles.toml"
    f.write_bytes(b'[[roles]]\npattern = "\xff\xfe"\nrole = "q"\n')
    with pytest.raises(UsageError, match="roles.toml.*UTF-8"):
        load_role_map(f)


@pytest.mark.parametrize(
    "doc, key",
    [
        ({"roles": [{"pattern": "x", "role": "q", "head_axis": "zero"}]}, "roles[0].head_axis"),
        ({"roles": [{"pattern": "x", "role": "q", "head_axis": [0]}]}, "roles[0].head_axis"),
        ({"roles": [{"pattern": "x", "role": "q"}], "n_heads": "many"}, "n_heads"),
        ({"roles": [{"pattern": "x", "role": "q"}], "n_kv_heads": 0}, "n_kv_heads"),
        ({"roles": [{"pattern": "x", "role": "q"}], "head_dim": {"a": 1}}, "head_dim"),
    ],
)
def test_role_map_bad_integers(tmp_path, doc, key):
    from ckptaudit.io.architectures import family_from_dict
    from ckptaudit.io.roles import load_role_map

    with pytest.raises(UsageError, match=key.replace("[", r"\[").replace("]", r"\]")):
        family_from_dict(doc, "role map", require_name=False)
    f = tmp_path / "roles.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(UsageError) as err:
        load_role_map(f)
    assert "roles.json" in str(err.value) and key in str(err.value)


@pytest.mark.parametrize(
    "change, key, match",
    [
        ({"n_head": "x"}, "n_head", "must be an integer"),
        ({"n_head": 0}, "n_head", "at least 1"),
        ({"num_attention_heads": 4, "num_key_value_heads": 0}, "num_key_value_heads", "at least 1"),
        ({"num_attention_heads": [4]}, "num_attention_heads", "must be an integer"),
    ],
)
def test_resolve_architecture_bad_config_dims(model_dir, change, key, match):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.roles import resolve_architecture

    ckpt = discover_run(model_dir)[0]
    with ckpt.tensors() as src:
        shapes = {k: tuple(src.shape(k)) for k in src.keys()}
    config = dict(ckpt.config()) | change
    with pytest.raises(CorruptFileError) as err:
        resolve_architecture(shapes, config)
    assert "config.json" in str(err.value) and key in str(err.value) and match in str(err.value)


def test_cli_role_map_not_utf8(tiny_run, tmp_path):
    f = tmp_path / "roles.toml"
    f.write_bytes(b'[[roles]]\npattern = "\xff"\nrole = "q"\n')
    assert_one_line_error(invoke("backbone", tiny_run, "--role-map", f), "roles.toml", "UTF-8")


def test_cli_role_map_bad_head_axis(tiny_run, tmp_path):
    f = tmp_path / "roles.json"
    f.write_text(json.dumps({"roles": [{"pattern": "attn", "role": "q", "head_axis": "x"}]}))
    assert_one_line_error(invoke("backbone", tiny_run, "--role-map", f), "roles.json", "head_axis")


@pytest.mark.parametrize("change, key", [({"n_head": "x"}, "n_head"), ({"n_head": 0}, "n_head")])
def test_cli_config_bad_head_count(model_dir, tmp_path, change, key):
    d = _copy(model_dir, tmp_path / "m")
    _edit_json(d / "config.json", **change)
    assert_one_line_error(invoke("inspect", d), "config.json", key)


# ------------------------------------------------------------------------------------------ 5. models


def test_model_config_rejected_by_transformers(model_dir, tmp_path):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model, param_shapes

    d = _copy(model_dir, tmp_path / "m")
    _edit_json(d / "config.json", n_head="x")
    ckpt = discover_run(d)[0]
    with pytest.raises(CorruptFileError, match="config.json"):
        param_shapes(ckpt)
    with pytest.raises(CorruptFileError, match="config.json"):
        load_model(ckpt)


def test_model_config_empty_is_not_missing(model_dir, tmp_path):
    from ckptaudit.io.models import param_shapes

    d = _copy(model_dir, tmp_path / "m")
    (d / "config.json").write_text("{}")
    ckpt = SimpleNamespace(path=d, config=lambda: {})
    with pytest.raises(CorruptFileError, match="config.json is empty") as err:
        param_shapes(ckpt)
    assert "no config.json" not in str(err.value)
    with pytest.raises(LayoutError, match="no config.json"):
        param_shapes(SimpleNamespace(path=d, config=lambda: None))


def test_cli_model_config_rejected_by_transformers(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ck = _copy(tiny_checkpoint, run / "checkpoint-60")
    _edit_json(ck / "config.json", n_head="x")
    result = invoke("resume-probe", ck, "--no-report", "--device", "cpu")
    assert_one_line_error(result, "config.json")


# ------------------------------------------------------------------------------------------ 6. tokenizers


def _break_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text("{not json")


def test_has_tokenizer_and_max_positions(model_dir, tmp_path):
    from ckptaudit.io.models import has_tokenizer, max_positions

    assert has_tokenizer(model_dir)
    assert not has_tokenizer(tmp_path)
    assert not has_tokenizer(tmp_path / "missing")
    assert max_positions({"n_positions": 16}) == 16
    assert max_positions({"n_positions": "x", "max_position_embeddings": 32}) == 32
    assert max_positions({"n_positions": True}) is None
    assert max_positions(None) is None and max_positions({}) is None


def test_data_broken_tokenizer(model_dir, tmp_path):
    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks.data import load_data

    d = _copy(model_dir, tmp_path / "m")
    _break_tokenizer(d)
    f = tmp_path / "a.txt"
    f.write_text("w1 w2 w3 " * 20)
    with pytest.raises(DataError) as err:
        load_data(discover_run(d)[0], data=f)
    msg = str(err.value)
    assert "a.txt" in msg and "tokenizer" in msg and "save_pretrained" in msg and ".npy" in msg


def _run_of(model_dir: Path, root: Path) -> Path:
    root.mkdir()
    for step in (1, 2):
        _copy(model_dir, root / f"checkpoint-{step}")
    return root


def test_regimes_probes_broken_tokenizer(model_dir, tmp_path):
    from ckptaudit.analyses.regimes.run import build_probes

    d = _copy(model_dir, tmp_path / "m")
    _break_tokenizer(d)
    config = json.loads((d / "config.json").read_text())
    with pytest.raises(DataError, match="tokenizer"):
        build_probes(d, config)
    # Without tokenizer files the token-id / random fallbacks still apply.
    bare = _model_dir(tmp_path / "bare", tokenizer=False)
    probes = build_probes(bare, json.loads((bare / "config.json").read_text()), n_probes=4)
    assert len(probes) == 4


def test_regimes_probes_tokenizer_without_pad(model_dir, tmp_path):
    from ckptaudit.analyses.regimes.run import build_probes

    d = _copy(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("eos_token", "unk_token", "pad_token", "bos_token"):
        cfg.pop(key, None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = json.loads((d / "config.json").read_text())
    with pytest.raises(DataError, match="cannot encode the probes") as err:
        build_probes(d, config)
    assert str(d) in str(err.value) and "\n" not in str(err.value)


def test_cli_regimes_broken_tokenizer(model_dir, tmp_path):
    run = _run_of(model_dir, tmp_path / "run")
    for ck in run.iterdir():
        _break_tokenizer(ck)
    assert_one_line_error(invoke("regimes", run), "tokenizer")


def test_regimes_with_a_non_integer_vocab_size_is_one_line(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for cfg in run.glob("checkpoint-*/config.json"):
        d = json.loads(cfg.read_text())
        d["vocab_size"] = "many"
        cfg.write_text(json.dumps(d))
    r = invoke("regimes", str(run), "--no-report", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("ckptaudit: error:") and "vocab_size" in r.stderr and "Traceback" not in r.output


def test_resuming_training_from_a_damaged_checkpoint_is_one_line(tiny_run, tmp_path):
    """tasks.train.load_checkpoint (extrapolate --time continues training from it): a missing scheduler or a
    truncated optimizer.pt is a CkptAuditError naming the file, not a raw torch/pickle error."""
    import shutil

    from ckptaudit.errors import CkptAuditError
    from ckptaudit.tasks.train import load_checkpoint

    ckpt = tmp_path / "checkpoint-30"
    shutil.copytree(tiny_run / "checkpoint-30", ckpt)
    (ckpt / "scheduler.pt").unlink()
    with pytest.raises(CkptAuditError, match="scheduler.pt"):
        load_checkpoint(ckpt)
    shutil.copy(tiny_run / "checkpoint-30" / "scheduler.pt", ckpt / "scheduler.pt")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CkptAuditError, match="optimizer.pt"):
        load_checkpoint(ckpt)
