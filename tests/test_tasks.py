"""Tests of ckptaudit.tasks: the modular-addition data, the training loop and the Trainer-layout run it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ckptaudit.errors import DataError
from ckptaudit.tasks import TASK_FILE, get_task, load_task_spec, task_from_checkpoint_dir
from ckptaudit.tasks.train import (
    CHECKPOINT_FILES,
    build_model,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    parameter_groups,
    train_run,
    train_step,
)

TINY_STEPS = list(range(0, 61, 10))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor ||a - b|| / ||b|| over the common keys (float64)."""
    assert set(a) == set(b)
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return worst


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


# -- data ------------------------------------------------------------------------------------------------
def test_sequences_and_labels_are_modular_addition():
    task = get_task("modadd", p=23)
    assert (task.vocab_size, task.seq_len) == (25, 4)
    batch = task.batch("train", step=3, batch_size=50, seed=7)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (50, 4) and ids.dtype == torch.long
    assert labels.shape == (50,) and labels.dtype == torch.long
    assert (ids[:, 1] == 23).all() and (ids[:, 3] == 24).all()
    for (a, _, b, _), c in zip(ids.tolist(), labels.tolist(), strict=True):
        assert 0 <= a < 23 and 0 <= b < 23 and c == (a + b) % 23


def test_batch_depends_only_on_split_step_batch_size_seed():
    task = get_task("modadd", p=23)
    other = get_task("modadd", p=23)  # a separate instance: no hidden state carried between calls
    later = task.batch("train", 5, 32, 1)
    task.batch("train", 0, 32, 1)
    task.batch("validation", 5, 32, 1)
    again = other.batch("train", 5, 32, 1)
    assert torch.equal(later["input_ids"], again["input_ids"])
    assert not torch.equal(later["input_ids"], task.batch("train", 6, 32, 1)["input_ids"])
    assert not torch.equal(later["input_ids"], task.batch("train", 5, 32, 2)["input_ids"])
    assert not torch.equal(later["input_ids"], task.batch("validation", 5, 32, 1)["input_ids"])
    streamed = list(task.batches("train", 32, 1, n=3, start=4))
    assert torch.equal(streamed[1]["labels"], later["labels"]) and len(streamed) == 3


def test_batches_walk_epochs_without_replacement():
    task = get_task("modadd", p=23)
    n = task.split_size("train")
    batch_size = 37  # does not divide n: batches straddle epoch boundaries
    steps = (3 * n) // batch_size
    pairs = torch.cat([task.batch("train", s, batch_size, 0)["input_ids"] for s in range(steps)])
    index = pairs[:, 0] * 23 + pairs[:, 2]
    train = set(task.split_indices("train").tolist())
    assert set(index.tolist()) <= train
    for epoch in range(2):  # each complete epoch is a permutation of the train split
        chunk = index[epoch * n : (epoch + 1) * n]
        assert sorted(chunk.tolist()) == sorted(train)
    assert not torch.equal(index[:n], index[n : 2 * n])  # a fresh order every epoch


def test_split_partitions_all_pairs():
    task = get_task("modadd", p=23, train_frac=0.3, split_seed=4)
    train = task.split_indices("train").tolist()
    val = task.split_indices("validation").tolist()
    assert len(train) == round(0.3 * 529) and len(train) + len(val) == 529
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(529))
    assert train == get_task("modadd", p=23, train_frac=0.3, split_seed=4).split_indices("train").tolist()
    assert train != get_task("modadd", p=23, train_frac=0.3, split_seed=5).split_indices("train").tolist()


def test_eval_batches_cover_the_split_in_fixed_order():
    task = get_task("modadd", p=23)
    first = [b["input_ids"] for b in task.eval_batches("validation", batch_size=100)]
    second = torch.cat([b["input_ids"] for b in task.eval_batches("validation", batch_size=100)])
    assert len(first) == -(-task.split_size("validation") // 100)
    got = torch.cat(first)
    assert torch.equal(got, second)
    assert sorted((got[:, 0] * 23 + got[:, 2]).tolist()) == task.split_indices("validation").tolist()


class _Oracle(torch.nn.Module):
    """Logits that put ``margin`` on the right answer at the last position (and garbage elsewhere)."""

    def __init__(self, p: int, vocab: int, margin: float):
        super().__init__()
        self.p, self.vocab, self.margin = p, vocab, margin
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        a, b = input_ids[:, 0], input_ids[:, 2]
        logits = torch.zeros(input_ids.shape[0], 4, self.vocab) + self.dummy
        logits[:, :-1, :] = 100.0  # earlier positions must not matter
        logits[:, -1, self.p :] = 1e4  # operator tokens are never candidates
        logits[torch.arange(len(a)), -1, (a + b) % self.p] += self.margin
        return logits


def test_loss_and_accuracy_use_the_last_position_number_tokens_only():
    task = get_task("modadd", p=23)
    batch = task.batch("train", 0, 64, 0)
    loss, acc = task.loss_and_accuracy(_Oracle(23, 25, margin=2.0), batch)
    # Reference by hand: one logit of 2 among 23 zeros.
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 22))
    assert acc == 1.0 and loss.requires_grad
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    val_loss, val_acc = task.evaluate(_Oracle(23, 25, margin=2.0), "validation")
    assert val_acc == 1.0 and val_loss == pytest.approx(expected, rel=1e-6)


def test_loss_matches_cross_entropy_of_a_real_model():
    task = get_task("modadd", p=23)
    model = build_model(task.model_config(n_layer=1, n_embd=16, n_head=2), seed=0)
    batch = task.batch("train", 0, 16, 0)
    loss, acc = task.loss_and_accuracy(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits[:, 3, :23]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-6)
    assert acc == pytest.approx((logits.argmax(-1) == batch["labels"]).float().mean().item())
    model.train()
    task.evaluate(model)
    assert model.training  # evaluate restores the mode


def test_model_config_is_deterministic_gpt2():
    cfg = get_task("modadd", p=23).model_config(n_layer=3, n_embd=48, n_head=4)
    assert cfg.model_type == "gpt2"
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (3, 48, 4, 4, 25)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert cfg.tie_word_embeddings


def test_registry_errors_name_the_problem():
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        get_task("nope")
    with pytest.raises(DataError, match="does not take parameter"):
        get_task("modadd", q=3)
    with pytest.raises(DataError, match=TASK_FILE):
        load_task_spec(Path("/nonexistent"))


# -- optimizer built like Trainer.create_optimizer -------------------------------------------------------
def test_parameter_groups_match_the_trainer_rule():
    from transformers import Trainer

    task = get_task("modadd", p=23)
    model = build_model(task.model_config(n_layer=2, n_embd=32, n_head=4), seed=0)
    decay, no_decay = parameter_groups(model)
    reference = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in model.named_parameters()]
    assert decay == [n for n in names if n in reference]
    assert no_decay == [n for n in names if n not in reference]
    assert "transformer.wte.weight" in decay and "transformer.h.0.ln_1.weight" in no_decay
    assert all("bias" not in n for n in decay)
    opt = build_optimizer(model, 1e-3, 0.5)
    groups = opt.state_dict()["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
    assert all("param_names" not in g for g in groups)


# -- the run on disk -------------------------------------------------------------------------------------
def test_tiny_run_has_the_trainer_layout(tiny_run: Path):
    ckpts = sorted(tiny_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [int(p.name.split("-")[1]) for p in ckpts] == TINY_STEPS
    for ckpt in ckpts:
        assert {p.name for p in ckpt.iterdir()} == set(CHECKPOINT_FILES)
    last = tiny_run / "checkpoint-60"

    state = json.loads((last / "trainer_state.json").read_text())
    for key in (
        "global_step",
        "epoch",
        "max_steps",
        "save_steps",
        "logging_steps",
        "eval_steps",
        "log_history",
    ):
        assert key in state
    assert (state["global_step"], state["max_steps"], state["save_steps"]) == (60, 60, 10)
    train_entries = [e for e in state["log_history"] if "loss" in e]
    eval_entries = [e for e in state["log_history"] if "eval_loss" in e]
    assert all(set(e) == {"loss", "grad_norm", "learning_rate", "epoch", "step"} for e in train_entries)
    assert [e["step"] for e in train_entries] == list(
        range(state["logging_steps"], 61, state["logging_steps"])
    )
    assert all(set(e) == {"eval_loss", "eval_accuracy", "epoch", "step"} for e in eval_entries)
    assert [e["step"] for e in eval_entries] == TINY_STEPS
    assert train_entries[-1]["loss"] < train_entries[0]["loss"]  # it does learn something

    weights = load_file(last / "model.safetensors")
    assert "lm_head.weight" not in weights and "transformer.wte.weight" in weights
    assert json.loads((last / "config.json").read_text())["n_positions"] == 4

    opt = torch.load(last / "optimizer.pt", weights_only=True)
    groups = opt["param_groups"]
    assert len(groups) == 2 and all("param_names" not in g for g in groups)
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0.0
    # Index -> name by the Trainer rule: group 0 decay names then group 1 no-decay names, consecutively.
    from transformers import GPT2Config

    model = build_model(GPT2Config.from_pretrained(last), seed=0)
    decay, no_decay = parameter_groups(model)
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
    assert sorted(i for g in groups for i in g["params"]) == list(range(len(decay) + len(no_decay)))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for i, name in enumerate(decay + no_decay):
        assert tuple(opt["state"][i]["exp_avg"].shape) == shapes[name]
        assert float(opt["state"][i]["step"]) == 60.0
    assert torch.load(tiny_run / "checkpoint-0" / "optimizer.pt", weights_only=True)["state"] == {}

    sched = torch.load(last / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 60
    with torch.serialization.safe_globals(
        [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    ):
        rng = torch.load(last / "rng_state.pth", weights_only=True)
    assert set(rng) == {"python", "numpy", "cpu"}

    spec = load_task_spec(last)
    assert {k: spec[k] for k in ("task", "p", "train_frac")} == {"task": "modadd", "p": 23, "train_frac": 0.5}
    assert {"split_seed", "batch_size", "data_seed", "train"} <= set(spec)
    assert task_from_checkpoint_dir(last) == get_task(
        "modadd", p=23, train_frac=0.5, split_seed=spec["split_seed"]
    )


def test_learning_rate_in_log_matches_scheduler(tiny_run: Path):
    spec = load_task_spec(tiny_run / "checkpoint-60")["train"]
    state = json.loads((tiny_run / "checkpoint-60" / "trainer_state.json").read_text())
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec["lr"])
    sched = build_scheduler(opt, spec["warmup_steps"], spec["max_steps"], spec["scheduler"])
    lrs = {}
    for step in range(1, 61):
        opt.step()
        sched.step()
        lrs[step] = sched.get_last_lr()[0]
    for entry in (e for e in state["log_history"] if "learning_rate" in e):
        assert entry["learning_rate"] == pytest.approx(lrs[entry["step"]])


def _small_run(out: Path) -> Path:
    task = get_task("modadd", p=11)
    config = task.model_config(n_layer=1, n_embd=16, n_head=2)
    return train_run(out, task, config, steps=8, save_steps=4, lr=3e-3, weight_decay=0.1, warmup_steps=2,
                     batch_size=32, seed=3, scheduler="linear")  # fmt: skip


def test_identical_runs_write_identical_bytes(tmp_path: Path):
    a, b = _small_run(tmp_path / "a"), _small_run(tmp_path / "b")
    for step in (0, 4, 8):
        for name in ("model.safetensors", TASK_FILE):
            assert (a / f"checkpoint-{step}" / name).read_bytes() == (
                b / f"checkpoint-{step}" / name
            ).read_bytes()
        oa = torch.load(a / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        ob = torch.load(b / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        for i, st in oa["state"].items():
            assert all(torch.equal(st[k], ob["state"][i][k]) for k in st)


def _resume_by_hand(ckpt: Path, fresh_optimizer: bool):
    """Rebuild model/optimizer/scheduler from the files with plain library calls (not load_checkpoint)."""
    from transformers import GPT2Config

    spec = json.loads((ckpt / TASK_FILE).read_text())
    hp = spec["train"]
    task = get_task("modadd", p=spec["p"], train_frac=spec["train_frac"], split_seed=spec["split_seed"])
    model = build_model(GPT2Config.from_pretrained(ckpt), seed=12345)  # init overwritten below
    missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    g0 = saved["param_groups"][0]
    opt = build_optimizer(model, g0["initial_lr"], g0["weight_decay"], tuple(g0["betas"]), g0["eps"])
    sched = build_scheduler(opt, hp["warmup_steps"], hp["max_steps"], hp["scheduler"])
    if not fresh_optimizer:
        opt.load_state_dict(saved)
        sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return model, opt, sched, task, hp


@pytest.mark.parametrize("start,k", [(20, 10), (0, 30)])
def test_resume_reproduces_the_later_checkpoint(tiny_run: Path, start: int, k: int):
    model, opt, sched, task, hp = _resume_by_hand(tiny_run / f"checkpoint-{start}", fresh_optimizer=False)
    for step in range(start, start + k):
        train_step(model, opt, sched, task, step, hp["batch_size"], hp["seed"], hp["max_grad_norm"])
    target = load_file(tiny_run / f"checkpoint-{start + k}" / "model.safetensors")
    assert _rel_diff(_weights(model), target) < 1e-6


def test_load_checkpoint_resumes_exactly(tiny_run: Path):
    state = load_checkpoint(tiny_run / "checkpoint-30")
    assert state.step == 30
    hp = state.spec["train"]
    for step in range(30, 40):
        train_step(state.model, state.optimizer, state.scheduler, state.task, step, hp["batch_size"], hp["seed"],
                   hp["max_grad_norm"])  # fmt: skip
    assert (
        _rel_diff(_weights(state.model), load_file(tiny_run / "checkpoint-40" / "model.safetensors")) < 1e-6
    )
    saved = torch.load(tiny_run / "checkpoint-40" / "optimizer.pt", weights_only=True)
    mine = state.optimizer.state_dict()
    for i, st in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert _rel_diff({"m": mine["state"][i][key]}, {"m": st[key]}) < 1e-5


def test_reset_optimizer_does_not_reproduce(tiny_run: Path):
    model, opt, sched, task, hp = _resume_by_hand(tiny_run / "checkpoint-20", fresh_optimizer=True)
    start = {k: v.clone() for k, v in _weights(model).items()}
    for step in range(20, 30):
        train_step(model, opt, sched, task, step, hp["batch_size"], hp["seed"], hp["max_grad_norm"])
    target = load_file(tiny_run / "checkpoint-30" / "model.safetensors")
    moved = _rel_diff({"all": torch.cat([v.flatten() for v in target.values()])},
                      {"all": torch.cat([start[k].flatten() for k in target])})  # fmt: skip
    gap = _rel_diff({"all": torch.cat([_weights(model)[k].flatten() for k in target])},
                    {"all": torch.cat([v.flatten() for v in target.values()])})  # fmt: skip
    assert gap > 1e-3 and gap > 0.05 * moved


def test_loss_is_the_cross_entropy_of_loss_and_accuracy_without_the_argmax(trainer_lm):
    """task.loss (what training steps and gradients use) equals F.cross_entropy over the model's own logits, for
    the built-in task and for windows of a text file, with the gradient of the same value."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptaudit.io.discover import discover_run
    from ckptaudit.tasks.data import load_data
    from ckptaudit.tasks.modadd import ModAdd

    task = ModAdd(p=23)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(task.model_config(n_layer=1, n_embd=16, n_head=2))
    batch = task.batch("train", 0, 16, 0)
    logits = model(input_ids=batch["input_ids"]).logits[:, -1, :23]
    assert torch.equal(task.loss(model, batch), F.cross_entropy(logits, batch["labels"]))
    ckpt = discover_run(trainer_lm / "seed0" / "run").checkpoints[-1]
    data = load_data(ckpt, data=trainer_lm / "seed0" / "data" / "train.jsonl")
    lm = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in ckpt.config().items() if k in ("vocab_size", "n_positions")},
                                    n_layer=1, n_embd=16, n_head=2)).eval()  # no dropout: one forward = another
    b = data.batch("train", 0, 2, 0)
    ids = b["input_ids"]
    kwargs = {"attention_mask": b["attention_mask"]} if "attention_mask" in b else {}
    want = F.cross_entropy(lm(input_ids=ids, **kwargs).logits[:, :-1].reshape(-1, lm.config.vocab_size).float(),
                           b.get("labels", ids)[:, 1:].reshape(-1), ignore_index=-100)
    got = data.loss(lm, b)
    assert torch.allclose(got, want, rtol=1e-6) and got.requires_grad
    assert float(got) == float(data.loss_and_accuracy(lm, b)[0])
