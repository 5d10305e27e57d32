"""Objects of other libraries read as plain data (io/plainpickle.py): real TrainingArguments, hostile pickles."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from ckptaudit.errors import CorruptFileError, UnsafePickleError
from ckptaudit.io.plainpickle import CLASS_KEY, load_plain


def test_training_arguments_fields_come_back_as_the_trainer_set_them(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
                                          lr_scheduler_type="cosine", warmup_steps=5, max_steps=100, seed=7,
                                          learning_rate=3e-4, report_to=[])
    torch.save(args, tmp_path / "training_args.bin")  # what Trainer._save writes
    plain = load_plain(tmp_path / "training_args.bin", ("transformers.", "accelerate."), "TrainingArguments")
    assert plain[CLASS_KEY] == "transformers.training_args.TrainingArguments"
    for field in ("per_device_train_batch_size", "warmup_steps", "max_steps", "seed", "learning_rate",
                  "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps"):
        assert plain[field] == getattr(args, field), field
    # Enum members come back as their values, nested dataclasses as dicts.
    assert plain["lr_scheduler_type"] == args.lr_scheduler_type.value == "cosine"
    assert plain["optim"] == args.optim.value
    assert plain["accelerator_config"]["even_batches"] == args.accelerator_config.even_batches


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"x": torch.zeros(2), "y": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=r"system"):
        load_plain(tmp_path / "evil.pt", ("transformers.",))
    # Even when the caller wrongly allows the module, the unpickler never calls it: torch blocks os/posix.
    with pytest.raises(UnsafePickleError):
        load_plain(tmp_path / "evil.pt", ("posix", "os", "nt"))
    assert not marker.exists()


def test_stand_ins_record_state_and_tensors_survive(tmp_path):
    class Scaler:  # pickled by reference to this test module: a global the reader must stand in for
        pass

    Scaler.__module__, Scaler.__qualname__ = "tests_fake_scaler", "Scaler"
    import sys
    import types

    mod = types.ModuleType("tests_fake_scaler")
    mod.Scaler = Scaler
    sys.modules["tests_fake_scaler"] = mod
    try:
        s = Scaler()
        s.cur_scale, s.scale_window = 65536.0, 1000
        torch.save({"loss_scaler": s, "flat": torch.arange(5.0)}, tmp_path / "optim.pt")
    finally:
        del sys.modules["tests_fake_scaler"]
    plain = load_plain(tmp_path / "optim.pt", ("tests_fake_scaler.",))
    assert plain["loss_scaler"] == {CLASS_KEY: "tests_fake_scaler.Scaler", "cur_scale": 65536.0,
                                    "scale_window": 1000}
    assert torch.equal(plain["flat"], torch.arange(5.0))


def test_damaged_archive_is_corrupt(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.pt"):
        load_plain(tmp_path / "cut.pt", ("transformers.",))
