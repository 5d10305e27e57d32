"""ckptaudit.io.optimizer against real optimizers: transformers.Trainer, Accelerate, Lightning-style, param_names.

Each test compares the loaded, name-keyed state with the live optimizer that wrote it (keyed by the parameter
object itself), so the index -> name mapping is checked against an independent reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402 - a core dependency: absent is a failure, not a skip
from conftest import tiny_gpt2_config, tiny_llama_config  # noqa: E402
from safetensors.torch import save_file

from ckptaudit.errors import OptimizerStateError, UnsafePickleError
from ckptaudit.io.discover import discover_run
from ckptaudit.io.optimizer import load_optimizer_state, load_scheduler_state, lr_history

VOCAB, SEQ = 64, 16


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids, labels = inputs (causal LM loss)."""

    def __init__(self, n: int = 32, seed: int = 0):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def gpt2_config():
    return tiny_gpt2_config(VOCAB, SEQ)


def llama_config():
    return tiny_llama_config(VOCAB, SEQ)


def train(config, out: Path):
    """A real Trainer run: 4 steps, checkpoint-2/ and checkpoint-4/ with optimizer.pt."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train()
    return trainer, model


def checkpoint(path: Path):
    """The Checkpoint for a checkpoint directory or file, as discover_run finds it."""
    run = discover_run(path)
    assert len(run) == 1, run
    return run[0]


def run_checkpoint(run_dir: Path, step: int):
    return discover_run(run_dir).by_step(step)


def named_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-run")
    trainer, model = train(gpt2_config(), out)
    return out, trainer, model


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-run")
    trainer, model = train(llama_config(), out)
    return out, trainer, model


def assert_matches_live(opt, optimizer, model) -> None:
    """Every named moment equals the live optimizer's state for that parameter object."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert set(opt.state) == {n for n, p in named if p in optimizer.state}
    for name, param in named:
        live = optimizer.state[param]
        assert torch.equal(opt.state[name].exp_avg, live["exp_avg"]), name
        assert torch.equal(opt.state[name].exp_avg_sq, live["exp_avg_sq"]), name
        assert opt.state[name].step == float(live["step"])
        assert opt.state[name].exp_avg.shape == param.shape


def assert_groups_match_live(opt, optimizer, model) -> None:
    """Group membership and hyper-parameters equal the live optimizer's param groups."""
    by_param = {p: n for n, p in model.named_parameters()}
    for g, group in enumerate(optimizer.param_groups):
        assert opt.names[g] == tuple(by_param[p] for p in group["params"])
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert opt.groups[g][key] == pytest.approx(group[key]), key
        assert "params" not in opt.groups[g] and "param_names" not in opt.groups[g]


# ------------------------------------------------------------------------------------------ Trainer


def test_trainer_gpt2_final_checkpoint_matches_live_optimizer(gpt2_run):
    out, trainer, model = gpt2_run
    opt = load_optimizer_state(run_checkpoint(out, 4), named_shapes(model))
    assert opt.mapping == "trainer:4.56+"
    assert opt.source.name == "optimizer.pt"
    assert_matches_live(opt, trainer.optimizer, model)
    assert_groups_match_live(opt, trainer.optimizer, model)
    # Group 0 is exactly the Trainer's own decay list; LayerNorm weights (ln_1/ln_2/ln_f) and biases are not.
    decay = set(trainer.get_decay_parameter_names(model)) & {n for n, _ in model.named_parameters()}
    assert set(opt.names[0]) == decay and not decay & set(opt.names[1])
    assert "transformer.h.0.ln_1.weight" in opt.names[1]
    assert opt.hyper("transformer.h.0.attn.c_attn.weight")["weight_decay"] == pytest.approx(0.1)
    assert opt.hyper("transformer.h.0.attn.c_attn.bias")["weight_decay"] == 0.0
    # raw is the file's dict, untouched: it restores the optimizer exactly.
    on_disk = torch.load(opt.source, weights_only=True)
    assert opt.raw["param_groups"] == on_disk["param_groups"]
    assert all(torch.equal(opt.raw["state"][i]["exp_avg"], s["exp_avg"]) for i, s in on_disk["state"].items())


def test_trainer_params_from_config_equal_explicit(gpt2_run):
    out, _, model = gpt2_run
    ckpt = run_checkpoint(out, 4)
    implicit = load_optimizer_state(ckpt)  # parameter shapes built from config.json on the meta device
    explicit = load_optimizer_state(ckpt, named_shapes(model))
    assert implicit.mapping == explicit.mapping and implicit.names == explicit.names
    for name, state in explicit.state.items():
        assert torch.equal(implicit.state[name].exp_avg, state.exp_avg)


def test_trainer_intermediate_checkpoint(gpt2_run):
    out, _, model = gpt2_run
    early = load_optimizer_state(run_checkpoint(out, 2), named_shapes(model))
    late = load_optimizer_state(run_checkpoint(out, 4), named_shapes(model))
    assert {s.step for s in early.state.values()} == {2.0}
    assert early.names == late.names
    name = "transformer.h.1.mlp.c_fc.weight"
    assert not torch.equal(early.state[name].exp_avg, late.state[name].exp_avg)
    assert early.hyper(name)["lr"] > late.hyper(name)["lr"]  # linear decay


def test_trainer_llama_rmsnorm_groups(llama_run):
    out, trainer, model = llama_run
    opt = load_optimizer_state(run_checkpoint(out, 4), named_shapes(model))
    assert opt.mapping.startswith("trainer:")
    assert_matches_live(opt, trainer.optimizer, model)
    assert_groups_match_live(opt, trainer.optimizer, model)
    assert set(opt.names[1]) == {n for n, _ in model.named_parameters() if "norm" in n}


def test_scheduler_and_lr_history(gpt2_run):
    out, trainer, _ = gpt2_run
    ckpt = run_checkpoint(out, 4)
    sched = load_scheduler_state(ckpt)
    assert sched["last_epoch"] == trainer.lr_scheduler.state_dict()["last_epoch"] == 4
    logged = [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "learning_rate" in e]
    assert lr_history(ckpt) == logged and [s for s, _ in logged] == [1, 2, 3, 4]
    assert lr_history(run_checkpoint(out, 2)) == logged[:2]


# ------------------------------------------------------------------------------- Accelerate, Lightning


def test_accelerate_save_state(tmp_path):
    import accelerate  # a dev dependency
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(gpt2_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = RandomTokens(8, seed=1)
    for i in range(2):
        batch = {
            k: torch.stack([data[j][k] for j in range(4 * i, 4 * i + 4)]) for k in ("input_ids", "labels")
        }
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    save_dir = tmp_path / "state"
    accelerator.save_state(str(save_dir))
    assert (save_dir / "optimizer.bin").is_file()

    ckpt = checkpoint(save_dir)
    assert ckpt.layout == "accelerate"
    opt = load_optimizer_state(ckpt, named_shapes(model))
    assert opt.mapping == "single-group"
    assert opt.source.name == "optimizer.bin"
    assert_matches_live(opt, optimizer.optimizer, model)
    assert_groups_match_live(opt, optimizer.optimizer, model)


def test_lightning_style_ckpt(tmp_path):
    torch.manual_seed(2)
    net = transformers.AutoModelForCausalLM.from_config(gpt2_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batch = RandomTokens(4, seed=2)[0]
    for _ in range(2):
        net(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = tmp_path / "epoch=0-step=2.ckpt"
    torch.save(
        {
            "epoch": 0,
            "global_step": 2,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
        },
        path,
    )
    ckpt = checkpoint(path)
    assert ckpt.layout == "lightning"
    opt = load_optimizer_state(ckpt, named_shapes(net))
    assert opt.mapping == "single-group"
    assert_matches_live(opt, optimizer, net)
    assert_groups_match_live(opt, optimizer, net)
    assert load_scheduler_state(ckpt)["last_epoch"] == 2
    assert load_scheduler_state(ckpt)["_last_lr"] == pytest.approx([3e-3 / 4])


def test_param_names_stored_by_torch(tmp_path):
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(llama_config())
    named = list(model.named_parameters())
    # Two groups that no Trainer rule produces: only the stored names can map them.
    optimizer = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if "mlp" in n], "lr": 1e-3},
            {"params": [(n, p) for n, p in named if "mlp" not in n], "lr": 5e-4, "weight_decay": 0.0},
        ]
    )
    batch = RandomTokens(4, seed=3)[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    optimizer.step()
    assert "param_names" in optimizer.state_dict()["param_groups"][0]
    run = tmp_path / "checkpoint-1"
    model.save_pretrained(run)
    torch.save(optimizer.state_dict(), run / "optimizer.pt")

    opt = load_optimizer_state(checkpoint(run))
    assert opt.mapping == "param_names"
    assert_matches_live(opt, optimizer, model)
    assert_groups_match_live(opt, optimizer, model)
    assert opt.hyper("model.layers.0.mlp.up_proj.weight")["lr"] == 1e-3

    # With parameters given, the stored names are checked against them.
    wrong = [
        (n, (s[0] + 1, *s[1:])) if n.endswith("mlp.up_proj.weight") else (n, s)
        for n, s in named_shapes(model)
    ]
    with pytest.raises(OptimizerStateError, match=r"mlp\.up_proj\.weight"):
        load_optimizer_state(checkpoint(run), wrong)


# ------------------------------------------------------------------------------------------ refusals


def test_refuses_shapes_that_do_not_fit(gpt2_run):
    out, _, model = gpt2_run
    params = named_shapes(model)
    # Same names and group sizes, one shape wrong: every rule's split fails on that parameter.
    params = [
        (n, (s[0], s[1] + 1)) if n == "transformer.h.1.attn.c_proj.weight" else (n, s) for n, s in params
    ]
    with pytest.raises(OptimizerStateError) as err:
        load_optimizer_state(run_checkpoint(out, 4), params)
    message = str(err.value)
    assert "transformer.h.1.attn.c_proj.weight" in message
    assert "(32, 32)" in message and "(32, 33)" in message


def test_refuses_group_size_mismatch(gpt2_run):
    out, _, model = gpt2_run
    params = named_shapes(model)[:-1]  # the model the optimizer was built from had one more parameter
    with pytest.raises(OptimizerStateError, match="group sizes"):
        load_optimizer_state(run_checkpoint(out, 4), params)


class Ambiguous(torch.nn.Module):
    """ln_1 is an RMSNorm-like module not named 'norm'; q_norm holds a 1-D 'gain'. Old and new Trainer rules
    both give groups of sizes (2, 1) with fitting shapes, but put different parameters in them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4, bias=False)
        self.ln_1 = torch.nn.Module()
        self.ln_1.weight = torch.nn.Parameter(torch.ones(4))
        self.q_norm = torch.nn.Module()
        self.q_norm.gain = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.w(x) * self.ln_1.weight * self.q_norm.gain


def test_refuses_ambiguous_rules(tmp_path):
    model = Ambiguous()
    decay = [model.w.weight, model.q_norm.gain]  # one valid reading (the old rule); the new rule differs
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": [model.ln_1.weight], "weight_decay": 0.0}])
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    run = tmp_path / "checkpoint-1"
    run.mkdir()
    save_file(dict(model.state_dict()), run / "model.safetensors")
    torch.save(optimizer.state_dict(), run / "optimizer.pt")
    with pytest.raises(OptimizerStateError, match="ambiguous") as err:
        load_optimizer_state(checkpoint(run), named_shapes(model))
    assert "trainer:4.56+" in str(err.value) and "trainer:4.40" in str(err.value)


def test_refuses_missing_optimizer(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(gpt2_config())
    run = tmp_path / "checkpoint-3"
    model.save_pretrained(run)
    with pytest.raises(OptimizerStateError, match="no optimizer state"):
        load_optimizer_state(checkpoint(run))
    assert load_scheduler_state(checkpoint(run)) is None
    assert lr_history(checkpoint(run)) == []


class Payload:
    """A pickle whose loading would create a file: weights-only loading must refuse it without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_pickle_never_runs(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(gpt2_config())
    run = tmp_path / "checkpoint-5"
    model.save_pretrained(run)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": Payload(str(marker))}, run / "optimizer.pt")
    with pytest.raises(UnsafePickleError):
        load_optimizer_state(checkpoint(run))
    assert not marker.exists()
