"""resume-probe on a PEFT LoRA run written by transformers' Trainer (fixtures/stacks.py peft_lora): the adapter
training resumes as the run did, the base model (base_model_name_or_path) wrapped by PEFT with the checkpoint's
adapter, only the adapter parameters trainable. CONTROL through the Trainer's own resume lands on the producer's
later checkpoint; in ckptaudit's loop it equals a real PEFT + torch.optim.AdamW replay of the same batches; RESET
differs; the base weights stay bit-identical; the restored optimizer state is the live run's, by name."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from conftest import build_threads, fixture_run
from safetensors.torch import load_file
from stack_helpers import CONTROL, RESET, producer

from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint, restored_optimizer
from ckptaudit.analyses.resume.run import ResumeSettings, run_condition

TASK = "modadd:p=13,train_frac=0.6"
BS = 4  # the producer's per_device_train_batch_size


@pytest.fixture(scope="module")
def root():
    return fixture_run("stack_peft", adopt_threads=False)


@pytest.fixture()
def threads(root):
    """The fixture build's torch threads around a replay (float reductions over another count round differently)."""
    previous, n = torch.get_num_threads(), build_threads(root)
    if n:
        torch.set_num_threads(n)
    yield
    torch.set_num_threads(previous)


def _model_name(file_name: str) -> str:
    """The PeftModel's parameter name of an adapter file tensor (PEFT inserts the adapter's name, 'default')."""
    return file_name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def _adapter(root, step: int) -> dict[str, torch.Tensor]:
    """The adapter weights the producer saved at ``step``, under the PeftModel's names."""
    return {_model_name(k): v for k, v in load_file(root / "run" / f"checkpoint-{step}" / "adapter_model.safetensors").items()}


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_base_untouched(root, model) -> None:
    """Every base weight of the PeftModel (base_layer.* and the rest) equals base/model.safetensors bit for bit."""
    base = load_file(root / "base" / "model.safetensors")
    state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
             for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, value in base.items():
        assert torch.equal(state[name], value), name


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n].double() - b[n].double()).norm() ** 2) for n in b)
    return math.sqrt(num / sum(float(b[n].double().norm() ** 2) for n in b))


def test_only_the_adapter_trains_and_the_start_hash_is_the_adapters(root):
    inputs = probe_inputs_from_checkpoint(root / "run" / "checkpoint-2", task=TASK, device="cpu")
    saved = _adapter(root, 2)
    assert sorted(_trained(inputs.model)) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(_trained(inputs.model)[name], value), name
    count = sum(v.numel() for v in saved.values())
    base_count = sum(v.numel() for v in load_file(root / "base" / "model.safetensors").values())
    assert inputs.report["adapter"]["trainable_parameters"] == count
    assert inputs.report["adapter"]["trainable_tensors"] == len(saved)
    assert inputs.report["adapter"]["frozen_parameters"] == base_count  # the base, its tied head counted once
    assert inputs.run_values["parameters_trained"]["value"].startswith(f"{count:,} in {len(saved)} LoRA adapter")
    assert [n for g in inputs.group_names for n in g] == [n for n, p in inputs.model.named_parameters() if p.requires_grad]
    _assert_base_untouched(root, inputs.model)
    # the hash of the probe's start weights: SHA-256 of the adapter tensors' bytes in sorted name order
    h = hashlib.sha256()
    for name in sorted(saved):
        h.update(saved[name].contiguous().view(torch.uint8).numpy().tobytes())
    control, _ = run_condition(CONTROL, inputs, ResumeSettings(steps=1, eval_every=1))
    assert control.start_sha256 == h.hexdigest()


def test_restored_optimizer_state_is_the_live_runs_by_name(root):
    """CONTROL's optimizer restored from checkpoint-6 holds, for every adapter parameter by name, the moments the
    producing run's live optimizer held at its end (producer.json)."""
    inputs = probe_inputs_from_checkpoint(root / "run" / "checkpoint-6", task=TASK, device="cpu")
    optimizer, scheduler = restored_optimizer(inputs.model, inputs)
    params = dict(inputs.model.named_parameters())
    live = producer(root)["moments"]
    assert sorted(live) == sorted(n for n, p in params.items() if p.requires_grad)
    for name, m in live.items():
        st = optimizer.state[params[name]]
        assert st["exp_avg"].reshape(-1)[:8].tolist() == pytest.approx(m["exp_avg"], rel=1e-7, abs=0)
        assert st["exp_avg_sq"].reshape(-1)[:8].tolist() == pytest.approx(m["exp_avg_sq"], rel=1e-7, abs=0)
        assert float(st["exp_avg"].double().sum()) == pytest.approx(m["sum_exp_avg"], rel=1e-6)
        assert float(st["step"]) == m["step"] == 6
    assert scheduler is not None and scheduler.last_epoch == 6


def test_trainer_control_lands_on_the_producers_later_checkpoint(root, threads):
    """Trainer.train(resume_from_checkpoint=checkpoint-2) on the PeftModel, over the run's rows (sequential sampler),
    for 2 steps: the adapter weights of the producer's checkpoint-4; a fresh optimizer lands elsewhere; the base
    weights stay bit-identical under both."""
    inputs = probe_inputs_from_checkpoint(root / "run" / "checkpoint-2", task=TASK, device="cpu",
                                          train_data=root / "data" / "train.jsonl")
    assert inputs.control_mode == "Trainer resume"
    settings = ResumeSettings(steps=2, eval_every=2)
    control, model = run_condition(CONTROL, inputs, settings)
    target = _adapter(root, 4)
    got = _trained(model)
    assert sorted(got) == sorted(target)
    for name, value in target.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    _assert_base_untouched(root, model)
    reset, reset_model = run_condition(RESET, inputs, settings)
    assert _rel(_trained(reset_model), target) > 1e-3
    _assert_base_untouched(root, reset_model)
    assert reset.start_sha256 == control.start_sha256


def _reference_replay(root, steps: int) -> dict[str, torch.Tensor]:
    """The run continued by hand: PEFT's own PeftModel.from_pretrained(base, checkpoint-2, is_trainable=True), a
    torch.optim.AdamW over its trainable parameters with optimizer.pt loaded, transformers' linear schedule with
    scheduler.pt loaded, ckptaudit's modadd batches of global steps 2, 3, ... (data seed 0, batch 4), clipping 1.0."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

    from ckptaudit.tasks import get_task

    ckpt = root / "run" / "checkpoint-2"
    base = GPT2LMHeadModel.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=True)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(saved["param_groups"]) == 2 and saved["param_groups"][1]["params"] == []  # LoRA weights all decay
    # built as the Trainer builds them (learning_rate 5e-2, linear over max_steps 6), then the saved states loaded
    optimizer = torch.optim.AdamW([{"params": trainable}, {"params": []}], lr=5e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 6)
    optimizer.load_state_dict(saved)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    task = get_task("modadd", p=13, train_frac=0.6)  # TASK
    for k in range(steps):
        model.train()
        batch = task.batch("train", 2 + k, BS, 0)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.loss_and_accuracy(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ckptaudit_loop_control_equals_a_real_peft_adamw_replay(root, threads):
    """Without the training set, CONTROL runs ckptaudit's loop (its own data order, the run's batch size, optimizer
    state and schedule): equal to the hand replay of the same batches with PEFT and torch's AdamW."""
    inputs = probe_inputs_from_checkpoint(root / "run" / "checkpoint-2", task=TASK, device="cpu")
    assert inputs.control_mode == "ckptaudit loop" and inputs.run_values["batch_size"]["value"] == BS
    control, model = run_condition(CONTROL, inputs, ResumeSettings(steps=3, eval_every=3))
    want = _reference_replay(root, 3)
    got = _trained(model)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    assert _rel(got, _adapter(root, 2)) > 1e-3  # it moved
    _assert_base_untouched(root, model)
    assert list(control.lr) == pytest.approx([0.05 * (6 - s) / 6 for s in (2, 3, 4)], rel=1e-6)


def test_cli_resume_probe_on_an_adapter_checkpoint(root, tmp_path):
    r = invoke("resume-probe", root / "run" / "checkpoint-4", "--task", TASK, "--train-data", root / "data" / "train.jsonl",
               "--lr-mult", "1", "--warmup-steps", "0", "--no-boundary-probe", "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, (r.output, r.stderr)
    doc = json.loads(r.stdout)
    assert [c["name"] for c in doc["conditions"]] == ["control", "reset"]
    st = doc["settings"]
    assert st["control"] == "Trainer resume" and st["steps"] == 2  # max_steps 6 from step 4
    assert st["adapter"]["trainable_parameters"] == sum(v.numel() for v in _adapter(root, 4).values())
    assert any("LoRA adapter run" in n for n in doc["notes"])
    # backbone vectors of an adapter run are over the merged weights, not the adapter parameters the probe moves
    from safetensors.torch import save_file

    save_file({"transformer.h.0.attn.c_attn.weight": torch.ones(32, 96)}, str(tmp_path / "v.safetensors"))
    r = invoke("resume-probe", root / "run" / "checkpoint-4", "--task", TASK, "--vectors", tmp_path / "v.safetensors",
               "--preserve-optimizer", "--no-report", "--device", "cpu")
    assert_one_line_error(r, "backbone vectors of an adapter run are over the merged weights", "drop --vectors")
    alone = tmp_path / "run"
    shutil.copytree(root / "run", alone)  # without the base model beside it
    r = invoke("resume-probe", alone / "checkpoint-4", "--task", TASK, "--no-report")
    assert_one_line_error(r, "the base model 'base' of this adapter is not available", "hf download base")
