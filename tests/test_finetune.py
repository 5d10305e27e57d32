"""finetune-probe: summary rules on planted series, trajectories against independent re-computation, LoRA targets,
embeddings frozen bit-for-bit under LoRA (checked against the weights on disk), and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from conftest import make_tiny_lm_dir
from safetensors.torch import load_file

from ckptaudit.analyses import finetune as ft
from ckptaudit.analyses.born_gap import Context, born_gap, born_observables
from ckptaudit.errors import UnknownArchitectureError, UsageError

WORDS = ["<unk>", "the", "old", "man", "felt", "a", "deep", "longing", "yearning", "joy", "relief", "for", "home",
         "ice", "cream"]
CTX = "the old man felt a deep"


# ---------------------------------------------------------------------------------------------- planted series


def test_flip_step_is_first_strictly_positive_step():
    assert ft.flip_step([-0.3, -0.2, -0.1, 0.0, 0.05, -0.01]) == 4  # 0.0 is not a flip
    assert ft.flip_step([0.2, 0.3]) == 0
    assert ft.flip_step([-0.3, -0.2, 0.0]) is None


def test_jump_ratio_and_character_on_planted_series():
    # Ten steps: nine of 0.01 and one of 0.91 -> max 0.91, mean (0.09 + 0.91) / 10 = 0.1 -> ratio 9.1.
    d = [0.01] * 4 + [0.91] + [0.01] * 5
    phi = np.concatenate([[-0.5], -0.5 + np.cumsum(d)])
    assert ft.jump_ratio(phi) == pytest.approx(9.1)
    assert ft.trajectory_character(ft.jump_ratio(phi)) == "catapult"
    # Equal steps (down as well as up: |dPhi| counts) -> ratio exactly 1 -> drift.
    assert ft.jump_ratio([0.0, -0.1, -0.2, -0.3]) == pytest.approx(1.0)
    assert ft.trajectory_character(1.0) == "drift"
    # Steps 0.1, 0.1, 0.4 -> max 0.4 / mean 0.2 = 2; and 0.6 among six steps of total 0.6 + 5*0.012 = 0.66
    # -> mean 0.11 -> ratio 6/1.1 = 5.4545... -> intermediate.
    assert ft.jump_ratio([0.0, 0.1, 0.2, 0.6]) == pytest.approx(2.0)
    r = ft.jump_ratio(np.cumsum([0.0, 0.012, 0.012, 0.6, 0.012, 0.012, 0.012]))
    assert r == pytest.approx(0.6 / 0.11)
    assert ft.trajectory_character(r) == "intermediate"
    # Boundaries are inclusive: 8 is a catapult, 5 is a drift.
    assert ft.trajectory_character(8.0) == "catapult" and ft.trajectory_character(5.0) == "drift"
    assert ft.jump_ratio([0.3, 0.3, 0.3]) is None and ft.trajectory_character(None) is None
    assert ft.jump_ratio([0.3]) is None


def test_failure_type_follows_drag():
    never = [-0.4, -0.3, -0.2]
    assert ft.failure_type(never, [-0.30, -0.25, -0.20]) == "kinematic"  # drag improved (rose)
    assert ft.failure_type(never, [-0.20, -0.30, -0.40]) == "structural"  # drag worsened (fell)
    assert ft.failure_type([-0.4, 0.1, 0.2], [-0.2, -0.3, -0.4]) is None  # flipped: no failure


def test_saturation_stop_step_on_planted_series():
    # Range 4, threshold 0.04; changes 1,1,1,1,0,0,0,0 -> the three changes after step 4 are all 0 -> stop at 4.
    assert ft.saturation_stop_step([0, 1, 2, 3, 4, 4, 4, 4, 4]) == 4
    # Range 4.09, threshold 0.0409: the changes 0.03, 0.03, 0.03 after step 2 are all below it -> stop at 2.
    assert ft.saturation_stop_step([0, 2, 4, 4.03, 4.06, 4.09]) == 2
    # Two small steps only, then movement, then the end: no plateau of three.
    assert ft.saturation_stop_step([0, 1, 1, 1, 2, 3]) is None
    # Steady drift (every change 1/5 of the range) never saturates.
    assert ft.saturation_stop_step([0, 1, 2, 3, 4, 5]) is None
    # A quiet stretch before a jump: literally a plateau at step 0; searched from the jump it is at step 5.
    catapult = [-1, -1, -1, -1, -1, 1, 1, 1, 1]
    assert ft.saturation_stop_step(catapult) == 0
    assert ft.saturation_stop_step(catapult, start=ft.flip_step(catapult)) == 5
    assert ft.saturation_stop_step([2.0, 2.0, 2.0]) == 0  # constant: saturated from the start


def test_phi_stop_of_a_context_resolved_before_training_is_after_its_rise():
    # Phi > 0 from step 0 (flip step 0) but nearly still for four steps, then a rise to a plateau: the slow start is
    # a literal plateau at step 0 (changes 0.0004 < 1% of the 0.2 range), the real one begins at step 7.
    phi = [0.006, 0.0064, 0.0068, 0.0072, 0.0076, 0.05, 0.15, 0.2, 0.2, 0.2, 0.2, 0.2]
    assert ft.saturation_stop_step(phi) == 0
    assert ft.largest_move_step(phi) == 6  # the change 0.05 -> 0.15 arrives at step 6
    series = {"phi": np.asarray(phi), "drag": np.zeros(len(phi)), "loss": np.linspace(3.0, 0.1, len(phi))}
    tr = ft.summarise(Context(CTX, " longing", " yearning"), " longing", " yearning", 7, 8, "lora", 2e-4,
                      len(phi) - 1, series, {"embedding": 0.0, "head": None, "unchanged": 1.0})
    assert tr.flip_step == 0
    assert tr.phi_stop_step == 7
    # A catapult from below zero still stops where its plateau starts (the flip and the largest move coincide).
    jump = [-1, -1, -1, -1, -1, 1, 1, 1, 1]
    assert ft.largest_move_step(jump) == 5 == ft.flip_step(jump)
    assert ft.largest_move_step([1.0]) == 0


def test_critical_lr_is_smallest_flipping_rate():
    assert ft.critical_lr([1e-4, 1e-3, 1e-2], [None, 12, 3]) == 1e-3
    assert ft.critical_lr([1e-2, 1e-4, 1e-3], [3, None, 12]) == 1e-3
    assert ft.critical_lr([1e-4, 1e-3], [None, None]) is None


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (tied head) with a WordLevel tokenizer, saved like any local model directory."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    return make_tiny_lm_dir(tmp_path_factory.mktemp("ft") / "tiny-lm", vocab, unk="<unk>")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) loaded through the project's own loaders, as the CLI does."""
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model, load_tokenizer

    return load_model(discover_run(tiny_dir).checkpoints[-1]), load_tokenizer(tiny_dir)


def _ids(tok, text=CTX):
    return tok(text, return_tensors="pt")["input_ids"]


def _observe(model, ids, y, c):
    """Independent evaluation of one model state: forward, softmax in float64, born_observables."""
    with torch.no_grad():
        z = model(input_ids=ids).logits[0, -1].double()
    U = model.get_input_embeddings().weight  # tied head in the GPT-2 fixture
    return born_observables(torch.softmax(z, -1), z, U, y, c), float(-torch.log_softmax(z, -1)[y])


def test_lora_leaves_embeddings_bit_identical_and_full_changes_them(tiny, tiny_dir):
    model, tok = tiny
    on_disk = load_file(str(tiny_dir / "model.safetensors"))["transformer.wte.weight"]
    y, c = WORDS.index("yearning"), WORDS.index("longing")
    targets, note = ft.lora_targets(model)
    assert targets == ("c_attn",) and "fused" in note
    series, _, trained, deltas = ft.finetune_trajectory(model, _ids(tok), y, c, "lora", 5e-2, steps=5, targets=targets)
    assert series["loss"][-1] < series["loss"][0]  # the adapter did train
    emb_after = trained.get_base_model().get_input_embeddings().weight.detach()
    assert torch.equal(emb_after, on_disk) and deltas["unchanged"] == 1.0 and deltas["embedding"] == 0.0
    assert trained.get_base_model().get_output_embeddings().weight.data_ptr() == emb_after.data_ptr()  # still tied
    _, _, full, deltas_full = ft.finetune_trajectory(model, _ids(tok), y, c, "full", 1e-2, steps=2)
    assert not torch.equal(full.get_input_embeddings().weight.detach(), on_disk)
    assert deltas_full["unchanged"] == 0.0 and deltas_full["embedding"] > 0
    # The base model itself was never touched.
    assert torch.equal(model.get_input_embeddings().weight.detach(), on_disk)


def test_recorded_step_matches_independent_training_and_evaluation(tiny):
    model, tok = tiny
    ids = _ids(tok)
    y, c = WORDS.index("yearning"), WORDS.index("longing")
    lr, k, n = 5e-3, 3, 6
    series, comp, _, _ = ft.finetune_trajectory(model, ids, y, c, "full", lr, steps=n)
    assert comp == c
    # Independent reference: the same plain AdamW loop written out here, stopped after k steps.
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(k):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(input_ids=ids).logits[0, -1][None], torch.tensor([y])).backward()
        opt.step()
    o, loss = _observe(ref, ids, y, c)
    for key, want in (("phi", o.phi), ("signal", o.signal), ("drag", o.drag), ("pr", o.pr), ("xi", o.xi),
                      ("p_y", o.p_y), ("p_c", o.p_c), ("logit_gap", o.logit_gap), ("loss", loss)):
        assert series[key][k] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    # LoRA: the model returned after k steps, evaluated on its own, gives the k-th record of a longer run.
    targets, _ = ft.lora_targets(model)
    long, _, _, _ = ft.finetune_trajectory(model, ids, y, c, "lora", 2e-2, steps=n, targets=targets, seed=7)
    _, _, short_model, _ = ft.finetune_trajectory(model, ids, y, c, "lora", 2e-2, steps=k, targets=targets, seed=7)
    o, loss = _observe(short_model, ids, y, c)
    assert long["phi"][k] == pytest.approx(o.phi, rel=1e-6, abs=1e-9)
    assert long["loss"][k] == pytest.approx(loss, rel=1e-6)
    assert long["phi"][k] != long["phi"][0]


def test_step_zero_equals_born_gap(tiny):
    model, tok = tiny
    for ctx in (Context(CTX, "yearning", "longing"), Context("the old man felt", "joy")):
        bg = born_gap(model, tok, [ctx]).observables[0]
        y = WORDS.index(ctx.target)
        c = None if ctx.competitor is None else WORDS.index(ctx.competitor)
        series, comp, _, _ = ft.finetune_trajectory(model, _ids(tok, ctx.context), y, c, "full", 1e-3, steps=1)
        assert comp == bg.competitor
        for key in ("phi", "signal", "drag", "pr", "xi", "p_y", "p_c", "logit_gap"):
            assert series[key][0] == pytest.approx(getattr(bg, key), rel=1e-12, abs=1e-15), key


def test_full_finetuning_decreases_loss(tiny):
    model, tok = tiny
    y, c = WORDS.index("yearning"), WORDS.index("longing")
    series, _, _, _ = ft.finetune_trajectory(model, _ids(tok), y, c, "full", 3e-3, steps=8)
    loss = series["loss"]
    assert loss[-1] < 0.6 * loss[0]
    assert np.all(np.diff(loss) < 0)  # one example, small rate: every step helps
    # The planted negative Born gap (yearning vs longing) is driven positive.
    assert series["phi"][0] < 0 and series["phi"][-1] > 0


def test_lora_on_tiny_llama_targets_q_and_v_and_freezes_untied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    targets, _ = ft.lora_targets(model)
    assert targets == ("q_proj", "v_proj")
    peft_model = ft.apply_lora(copy.deepcopy(model), targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "v_proj"}
    series, _, _, deltas = ft.finetune_trajectory(model, torch.tensor([[1, 2, 3, 4]]), 5, 6, "lora", 1e-2, steps=3,
                                                  targets=targets)
    assert deltas["head"] == 0.0 and deltas["embedding"] == 0.0 and deltas["unchanged"] == 1.0
    assert series["loss"][-1] < series["loss"][0]


def test_lora_targets_unknown_architecture_and_override():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)

    with pytest.raises(UnknownArchitectureError, match="--target-modules"):
        ft.lora_targets(Odd())
    assert ft.lora_targets(Odd(), ["mixer"])[0] == ("mixer",)
    with pytest.raises(UsageError, match="nope"):
        ft.lora_targets(Odd(), ["nope"])


# ---------------------------------------------------------------------------------------------- CLI


def _contexts(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_cli_json_keys_sweep_and_report(tiny_dir, tmp_path):
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "yearning", "competitor": "longing"}])
    out = tmp_path / "f.h5"
    args = ["finetune-probe", str(tiny_dir), "--contexts", str(ctx), "--mode", "full", "--train-steps", "4",
            "--lr-sweep", "1e-5,1e-2", "--device", "cpu", "--seed", "1", "--json", "--out", str(out)]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    keys = {"target", "mode", "lr", "phi", "signal", "drag", "loss", "flip_step", "jump_ratio", "character",
            "failure_type", "phi_stop_step", "ce_stop_step", "embeddings_unchanged"}
    assert len(doc["contexts"]) == 2
    for c in doc["contexts"]:
        assert keys <= set(c)
        assert c["mode"] == "full" and len(c["phi"]) == len(c["loss"]) == 5
        assert c["embeddings_unchanged"] is False
        # The flip step is the first positive Phi of the recorded series.
        assert c["flip_step"] == next((t for t, v in enumerate(c["phi"]) if v > 0), None)
    by_lr = {c["lr"]: c for c in doc["contexts"]}
    assert by_lr[1e-5]["flip_step"] is None and by_lr[1e-5]["failure_type"] in ("kinematic", "structural")
    assert by_lr[1e-2]["flip_step"] is not None
    crit = doc["critical_lr"]
    assert crit["per_context"][0]["critical_lr"] == 1e-2 and crit["median"] == 1e-2
    with h5py.File(out) as f:
        g = f["finetune_probe"]
        assert g.attrs["mode"] == "full"
        np.testing.assert_allclose(g["contexts/0/phi"][()], doc["contexts"][0]["phi"])
    # Deterministic given --seed (LoRA draws its adapter at random).
    lora = ["finetune-probe", str(tiny_dir), "--contexts", str(ctx), "--train-steps", "3", "--lr", "1e-2", "--seed", "3",
            "--device", "cpu", "--json", "--no-report"]
    a, b = invoke(*lora), invoke(*lora)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout
    la = json.loads(a.stdout)
    assert la["contexts"][0]["embeddings_unchanged"] is True and la["target_modules"] == ["c_attn"]
    assert "critical_lr" not in la


def test_cli_multi_token_target_exits_2_naming_it(tiny_dir, tmp_path):
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "ice cream"}])
    r = invoke("finetune-probe", str(tiny_dir), "--contexts", str(ctx), "--train-steps", "2", "--device", "cpu",
               "--no-report")
    assert r.exit_code == 2
    assert "ice cream" in r.stderr and "Traceback" not in r.output


def test_cli_usage_errors(tiny_dir, tmp_path):
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "joy"}])
    base = ["finetune-probe", str(tiny_dir), "--contexts", str(ctx), "--device", "cpu", "--no-report"]
    for extra, word in ((["--mode", "half"], "half"), (["--lr", "1e-3", "--lr-sweep", "1e-3"], "--lr-sweep"),
                        (["--lr-sweep", "1e-3,abc"], "abc"), (["--target-modules", "nope"], "nope")):
        r = invoke(*(base + extra))
        assert r.exit_code == 2, (extra, r.output)
        assert word in r.stderr


def test_cli_plot_writes_one_png_per_run(tiny_dir, tmp_path):
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "yearning", "competitor": "longing"}])
    figs = tmp_path / "figs"
    r = invoke("finetune-probe", str(tiny_dir), "--contexts", str(ctx), "--mode", "full", "--train-steps", "2",
               "--lr-sweep", "1e-3,1e-2", "--device", "cpu", "--no-report", "--plot", str(figs), "--quiet")
    assert r.exit_code == 0, r.output
    pngs = sorted(figs.glob("*.png"))
    assert len(pngs) == 2  # one context, two learning rates
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
