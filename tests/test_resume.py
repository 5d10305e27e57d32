"""resume-probe: exact restoration against saved checkpoints (own loop and the real transformers.Trainer),
identical starting weights, bad optimizer state, missing optimizer state, CLI keys and reports."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptaudit.analyses.resume.conditions import ProbeInputs, optimizer_class, probe_inputs_from_checkpoint
from ckptaudit.analyses.resume.run import (
    ConditionSpec,
    ResumeSettings,
    default_eval_steps,
    first_collapse,
    plan_conditions,
    run_condition,
    run_resume_probe,
)

CONTROL = ConditionSpec("control", "preserved", 1.0, 0, "saved")
RESET = ConditionSpec("reset", "reset", 1.0, 0, "constant")




def saved_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt_dir / "model.safetensors")


def assert_matches_saved(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert set(params) <= set(saved)
    for name, p in params.items():
        torch.testing.assert_close(p.detach().cpu(), saved[name], rtol=1e-5, atol=1e-7, msg=name)


def max_rel_diff(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> float:
    return max(
        float((p.detach().cpu() - saved[n]).norm() / saved[n].norm().clamp_min(1e-12)) for n, p in model.named_parameters()
    )


# ------------------------------------------------------------------------------------------ pure pieces


def test_eval_steps_and_collapse_rule():
    assert default_eval_steps(50) == [0, 1, 2, 5, 10, 20, 50]
    assert default_eval_steps(30) == [0, 1, 2, 5, 10, 20, 30]
    assert default_eval_steps(7, every=3) == [0, 3, 6, 7]
    steps = [0, 1, 2, 5]
    # accuracy drop of exactly 0.2 is not "more than" 0.2; 0.21 is
    assert first_collapse(steps, [1.0, 1.0, 1.0, 1.0], [0.9, 0.7, 0.9, 0.9], 0.2, 2.0, 0.1) is None
    assert first_collapse(steps, [1.0, 1.0, 1.0, 1.0], [0.9, 0.9, 0.69, 0.9], 0.2, 2.0, 0.1)[:2] == (2, "accuracy")
    # 0.21 is above 2x 0.1 and 0.11 nats above it: a collapse with a 0.1 floor, not with a 0.2 floor
    assert first_collapse(steps, [0.1, 0.15, 0.21, 0.1], [0.9] * 4, 0.2, 2.0, 0.1)[:2] == (2, "loss")
    assert first_collapse(steps, [0.1, 0.15, 0.21, 0.1], [0.9] * 4, 0.2, 2.0, 0.2) is None
    assert first_collapse(steps, [0.1, math.nan, 0.1, 0.1], [0.9] * 4, 0.2, 2.0, 0.1)[:2] == (1, "non-finite")
    # A converged model: 8.5e-5 -> 2.8e-4 is 3.3x the start but 2e-4 nats: not a collapse under the 0.1 floor.
    assert first_collapse(steps, [8.5e-5, 2.8e-4, 2.8e-4, 2.8e-4], [0.98] * 4, 0.2, 2.0, 0.1) is None
    hit = first_collapse(steps, [0.01, 0.5, 0.5, 0.5], [0.98] * 4, 0.2, 2.0, 0.1)
    assert hit[:2] == (1, "loss") and "0.01 -> 0.5" in hit[2]


def test_plan_and_schedules():
    names = [c.name for c in plan_conditions(ResumeSettings(warmup_steps=4), True)]
    assert names == ["control", "reset", "reset_lr0.1", "reset_lr0.01", "reset_warmup4", "warmup_boundary"]
    assert [c.name for c in plan_conditions(ResumeSettings(mode="preserve"), True)] == ["control"]
    assert "control" not in [c.name for c in plan_conditions(ResumeSettings(), False)]
    warm = ConditionSpec("w", "reset", 1.0, 4, "linear-warmup")
    assert [warm.multiplier(k, 10) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    geo = ConditionSpec("g", "reset", 1.0, 0, "geometric")
    assert geo.multiplier(0, 11) == pytest.approx(1e-3) and geo.multiplier(10, 11) == pytest.approx(1.0)
    assert geo.multiplier(5, 11) == pytest.approx(10 ** -1.5)


def test_optimizer_class_from_groups():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        assert optimizer_class(cls(p, lr=0.1).state_dict()["param_groups"]) is cls


# ------------------------------------------------------------------------------------------ own training loop


@pytest.mark.slow
def test_control_reproduces_saved_checkpoint_reset_does_not(tiny_run: Path):
    """CONTROL from checkpoint-20 for 10 steps lands on the run's own checkpoint-30 (saved by the original loop)."""
    inputs = probe_inputs_from_checkpoint(tiny_run / "checkpoint-20", device="cpu")
    assert inputs.start_step == 20 and inputs.optimizer_state is not None
    settings = ResumeSettings(steps=10, eval_every=10)
    target = saved_weights(tiny_run / "checkpoint-30")
    control, control_model = run_condition(CONTROL, inputs, settings)
    assert_matches_saved(control_model, target)
    reset, reset_model = run_condition(RESET, inputs, settings)
    assert max_rel_diff(reset_model, target) > 1e-3
    # same start, same data, and the displacement is measured against the same theta_0
    assert control.start_sha256 == reset.start_sha256
    start = saved_weights(tiny_run / "checkpoint-20")
    expected = math.sqrt(sum(float(((p.detach().double() - start[n].double()) ** 2).sum()) for n, p in control_model.named_parameters()))
    assert control.displacement[-1] == pytest.approx(expected, rel=1e-6)
    assert control.displacement[0] == 0.0 and control.steps == (0, 10)


def test_start_hashes_equal_and_match_the_file(tiny_run: Path):
    inputs = probe_inputs_from_checkpoint(tiny_run / "checkpoint-30", device="cpu")
    result = run_resume_probe(inputs, ResumeSettings(steps=2, lr_mults=(1.0, 0.1), warmup_steps=2))
    assert {c.start_sha256 for c in result.conditions} == {result.start_weights_sha256}
    assert len(result.conditions) == 5
    # Independent hash: the raw bytes of the safetensors file's tensors, in sorted name order.
    h = hashlib.sha256()
    with safe_open(str(tiny_run / "checkpoint-30" / "model.safetensors"), framework="pt") as f:
        params = {n for n, _ in inputs.model.named_parameters()}
        for name in sorted(k for k in f.keys() if k in params):
            h.update(f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes())
    assert result.start_weights_sha256 == h.hexdigest()
    assert result.provenance_complete is True


def test_vectors_backbone_coordinate(tiny_run: Path, tmp_path: Path):
    inputs = probe_inputs_from_checkpoint(tiny_run / "checkpoint-20", device="cpu")
    # v_b = the run's own drift direction checkpoint-0 -> checkpoint-20 on two tensors, in the [k, *shape] layout.
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    w0, w20 = saved_weights(tiny_run / "checkpoint-0"), saved_weights(tiny_run / "checkpoint-20")
    v = {n: (w20[n] - w0[n]).double() for n in names}
    norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
    v = {n: x / norm for n, x in v.items()}
    save_file({n: torch.stack([x, torch.zeros_like(x)]).float().contiguous() for n, x in v.items()}, tmp_path / "v.safetensors")
    from ckptaudit.analyses.resume.run import load_backbone_vector

    vec = load_backbone_vector(tmp_path / "v.safetensors", inputs.model)
    result, model = run_condition(CONTROL, inputs, ResumeSettings(steps=3, eval_every=3), vector=vec)
    d = {n: p.detach().double() - w20[n].double() for n, p in model.named_parameters() if n in names}
    a = sum(float((d[n] * v[n].float().double()).sum()) for n in names)
    r = math.sqrt(sum(float(((d[n] - a * v[n].float().double()) ** 2).sum()) for n in names))
    assert result.backbone_coord[-1] == pytest.approx(a, rel=1e-4, abs=1e-9)
    assert result.transverse_residual[-1] == pytest.approx(r, rel=1e-4, abs=1e-9)
    assert result.backbone_coord[0] == 0.0


# ------------------------------------------------------------------------------------------ real Trainer

BS = 4


def _trainer_run(out: Path) -> tuple[torch.Tensor, object]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (6 * BS, 8), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=BS, learning_rate=1e-2,
        weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, use_cpu=True,
        report_to=[], seed=0, train_sampling_strategy="sequential", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return ids, trainer


def test_control_reproduces_a_real_trainer_run(tmp_path: Path):
    """A run written by transformers.Trainer (sequential sampler: batch of global step s = rows s*BS..(s+1)*BS):
    its optimizer.pt and scheduler.pt restored into the CONTROL path, resumed from checkpoint-3 for 3 steps on the
    same batches, reproduce checkpoint-6; a fresh optimizer does not.

    The Trainer passes ``num_items_in_batch`` to the model (its loss is a token sum divided by that count, which its
    own rule computes, here 32 for 28 shifted targets), so the replayed step asks the Trainer for the same count:
    the gradient, and with it the clipping, is then the Trainer's."""
    from transformers import get_linear_schedule_with_warmup

    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model
    from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state

    ids, trainer = _trainer_run(tmp_path)
    ckpt = discover_run(tmp_path / "checkpoint-3").checkpoints[0]
    model = load_model(ckpt)
    opt = load_optimizer_state(ckpt, [(n, tuple(p.shape)) for n, p in model.named_parameters()])

    def step(m, optimizer, k):
        batch = ids[(3 + k) * BS : (4 + k) * BS]
        m.train()
        optimizer.zero_grad(set_to_none=True)
        n_items = trainer._get_num_items_in_batch([{"labels": batch}], torch.device("cpu"))
        loss = m(input_ids=batch, labels=batch, num_items_in_batch=n_items).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    def evaluate(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss), 0.0

    inputs = ProbeInputs(
        model=model, group_names=opt.names, group_hyper=opt.groups,
        optimizer_cls=optimizer_class(opt.raw["param_groups"]), train_step=step, evaluate=evaluate, start_step=3,
        optimizer_state=opt.raw, scheduler_state=load_scheduler_state(ckpt),
        scheduler_factory=lambda o: get_linear_schedule_with_warmup(o, 0, 6), source=str(ckpt.path),
    )  # fmt: skip
    target = saved_weights(tmp_path / "checkpoint-6")
    settings = ResumeSettings(steps=3, eval_every=3)
    _, control_model = run_condition(CONTROL, inputs, settings)
    assert_matches_saved(control_model, target)
    _, reset_model = run_condition(RESET, inputs, settings)
    assert max_rel_diff(reset_model, target) > 1e-3


# ------------------------------------------------------------------------------------------ CLI


def _copy_checkpoint(tiny_run: Path, tmp_path: Path, step: int = 20) -> Path:
    dest = tmp_path / f"checkpoint-{step}"
    shutil.copytree(tiny_run / f"checkpoint-{step}", dest)
    return dest


@pytest.mark.slow
def test_cli_json_keys_report_and_plot(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "r.h5"
    r = invoke("resume-probe", tiny_run / "checkpoint-30", "--train-steps", 2, "--lr-mult", "1,0.1", "--warmup-steps", 2,
               "--device", "cpu", "--json", "--out", out, "--plot", tmp_path / "fig")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("conditions", "level2_sensitive", "max_safe_reset_lr_mult", "warmup_boundary_lr_mult", "start_weights_sha256"):
        assert key in doc
    names = [c["name"] for c in doc["conditions"]]
    assert names == ["control", "reset", "reset_lr0.1", "reset_warmup2", "warmup_boundary"]
    for c in doc["conditions"]:
        for key in ("name", "optimizer", "lr_mult", "warmup_steps", "steps", "eval_loss", "eval_acc", "displacement",
                    "verdict", "collapse_step"):  # fmt: skip
            assert key in c, key
        assert c["verdict"] in ("stable", "collapse") and c["steps"][0] == 0
    assert doc["conditions"][0]["optimizer"] == "preserved" and doc["conditions"][1]["optimizer"] == "reset"
    assert doc["conditions"][-1]["steps"] == [0, 1, 2]  # the boundary probe evaluates every step
    with h5py.File(out) as f:
        assert f["resume_probe"].attrs["start_weights_sha256"] == doc["start_weights_sha256"]
        assert list(f["resume_probe/control/eval_acc"][()]) == pytest.approx(doc["conditions"][0]["eval_acc"])
    assert (tmp_path / "fig" / "resume_probe_loss_accuracy.png").stat().st_size > 0


def test_cli_mismatched_optimizer_state_names_the_parameter(tiny_run: Path, tmp_path: Path):
    ckpt = _copy_checkpoint(tiny_run, tmp_path)
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    first = sd["state"][0]["exp_avg"]  # index 0 = first decay parameter = transformer.wte.weight
    sd["state"][0]["exp_avg"] = torch.zeros(first.shape[0] + 1, first.shape[1])
    torch.save(sd, ckpt / "optimizer.pt")
    r = invoke("resume-probe", ckpt, "--train-steps", 1, "--no-report", "--device", "cpu")
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("ckptaudit: error:") and "transformer.wte.weight" in err and "Traceback" not in r.output


def test_cli_without_optimizer_state_runs_reset_only(tiny_run: Path, tmp_path: Path):
    ckpt = _copy_checkpoint(tiny_run, tmp_path)
    (ckpt / "optimizer.pt").unlink()
    r = invoke("resume-probe", ckpt, "--train-steps", 2, "--lr-mult", "1", "--warmup-steps", 0, "--no-boundary-probe",
               "--no-report", "--device", "cpu", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [c["optimizer"] for c in doc["conditions"]] == ["reset"]
    assert doc["provenance_complete"] is False and doc["level2_sensitive"] is None
    assert any("provenance incomplete" in n for n in doc["notes"])
    r = invoke("resume-probe", ckpt, "--preserve-optimizer", "--train-steps", 1, "--no-report", "--device", "cpu")
    assert r.exit_code == 2 and "no optimizer state" in r.stderr


def test_cli_checkpoint_without_task_is_a_clear_error(tiny_run: Path, tmp_path: Path):
    ckpt = _copy_checkpoint(tiny_run, tmp_path)
    (ckpt / "ckptaudit_task.json").unlink()
    r = invoke("resume-probe", ckpt, "--train-steps", 1, "--no-report", "--device", "cpu")
    assert r.exit_code == 2 and "--task" in r.stderr and "Traceback" not in r.output
    r = invoke("resume-probe", ckpt, "--reset-optimizer", "--preserve-optimizer", "--no-report")
    assert r.exit_code == 2 and "exclude each other" in r.stderr


def test_data_file_without_optimizer_state_runs_reset_only(tmp_path):
    """--data: a plain model directory (no optimizer state) trained on a text file; RESET only, provenance incomplete,
    and the step-0 eval loss equals the next-token loss computed independently on the same validation sequences."""
    from conftest import make_tiny_lm_dir

    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model
    from ckptaudit.tasks.data import load_data

    words = [f"w{i}" for i in range(20)]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": 20, "[EOS]": 21}
    model_dir = make_tiny_lm_dir(tmp_path / "lm", vocab, unk="[UNK]", eos="[EOS]", n_embd=16, n_layer=1, n_head=2)
    rng = np.random.default_rng(0)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, size=15)) for _ in range(400)) + "\n")
    r = invoke("resume-probe", str(model_dir), "--data", str(text), "--train-steps", "5", "--lr-mult", "1",
               "--lr", "1e-3", "--warmup-steps", "0", "--no-boundary-probe", "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["provenance_complete"] is False
    assert {c["optimizer"] for c in doc["conditions"]} == {"reset"}
    ckpt = discover_run(model_dir).checkpoints[0]
    data = load_data(ckpt, data=text)
    model = load_model(ckpt)
    losses, counts = [], []
    with torch.no_grad():
        for batch in data.eval_batches("validation", 64):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            target = batch["input_ids"][:, 1:]
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                            reduction="sum").item())
            counts.append(target.numel())
    assert abs(doc["conditions"][0]["eval_loss"][0] - sum(losses) / sum(counts)) < 1e-4


def test_a_task_of_another_vocabulary_is_refused_and_chance_accuracy_is_said(tiny_checkpoint):
    """The tiny run is modadd with p = 23 (25 tokens): --task modadd:p=53 is another task (55 tokens) and is
    refused with the fix; the run's own task starts at chance accuracy (1/23), which the report says."""
    import json

    from cli_helpers import assert_one_line_error, invoke

    spec = json.loads((tiny_checkpoint / "ckptaudit_task.json").read_text())
    assert spec["p"] == 23
    line = assert_one_line_error(invoke("resume-probe", tiny_checkpoint, "--task", "modadd:p=53", "--train-steps", 1,
                                        "--no-report"), "55", "25", "modadd:p=23")
    assert "vocabulary" in line
    r = invoke("resume-probe", tiny_checkpoint, "--train-steps", 1, "--no-report", "--json", "--preserve-optimizer")
    doc = json.loads(r.stdout)
    start = doc["conditions"][0]["eval_acc"][0]
    assert start <= 1.5 / 23
    assert any("at chance" in n and f"{1 / 23:.4g}" in n for n in doc["notes"])
