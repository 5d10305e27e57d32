"""`gxs`: QK transplant, G/S velocity, slack probe — checked against independent references.

References used: direct slicing of the fused tensors by the SPEC §0 layouts (not through Piece), attention
patterns computed by transformers (eager attention), logits of the plain model, and velocities computed by
flattening the checkpoints' G and S parameters.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import invoke
from runs import write_checkpoint
from safetensors.torch import load_file

from ckptaudit.analyses.gxs.evaluation import margins_of
from ckptaudit.analyses.gxs.run import (
    TaskEval,
    TokenEval,
    all_heads,
    default_conditions,
    evaluate,
    qk_pieces,
    run_slack,
    run_transplant,
    run_velocity,
    touched_query_heads,
    transplant,
)
from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model
from ckptaudit.io.roles import GROUPS, resolve_architecture
from ckptaudit.tasks import task_from_checkpoint_dir


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.contiguous().view(torch.int32),
                                                                   y.contiguous().view(torch.int32))


def _arch_of(sd: dict, config) -> object:
    return resolve_architecture({k: tuple(v.shape) for k, v in sd.items()}, config.to_dict())


def _tiny_model(kind: str, seed: int):
    """A tiny random model of a transformers family, built from a config (nothing downloaded)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16)
        cls = tf.GPT2LMHeadModel
    elif kind == "neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                               vocab_size=50, max_position_embeddings=16)
        cls = tf.GPTNeoXForCausalLM
    else:
        cfg = tf.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, vocab_size=50, max_position_embeddings=16)
        cls = tf.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    # Random init keeps biases at zero; give them values so that bias slices are part of the check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _patterns(model, sd: dict, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions


def _assert_only_heads_change(before, after, block: int, changed: set[int]) -> None:
    for layer in range(block):  # upstream layers cannot see the transplant
        torch.testing.assert_close(after[layer], before[layer], rtol=0, atol=1e-6)
    for h in range(before[block].shape[1]):
        diff = (after[block][:, h] - before[block][:, h]).abs().max().item()
        if h in changed:
            assert diff > 1e-3, f"head {h} of block {block} should change, max diff {diff}"
        else:
            assert diff < 1e-6, f"head {h} of block {block} should not change, max diff {diff}"


# ------------------------------------------------------------------------------------------ transplant


def test_all_heads_there_and_back_is_bit_exact(tiny_run):
    a = load_file(tiny_run / "checkpoint-60" / "model.safetensors")
    b = load_file(tiny_run / "checkpoint-30" / "model.safetensors")
    config = json.loads((tiny_run / "checkpoint-60" / "config.json").read_text())
    arch = resolve_architecture({k: tuple(v.shape) for k, v in a.items()}, config)
    pieces = qk_pieces(arch, all_heads(arch))
    hybrid = transplant(a, b, pieces)
    d = config["n_embd"]
    for layer in range(config["n_layer"]):
        w, bias = f"transformer.h.{layer}.attn.c_attn.weight", f"transformer.h.{layer}.attn.c_attn.bias"
        # SPEC §0: columns [0, 2d) are Q|K (from B), [2d, 3d) is V (still A's).
        assert _bits_equal(hybrid[w][:, : 2 * d], b[w][:, : 2 * d])
        assert _bits_equal(hybrid[w][:, 2 * d :], a[w][:, 2 * d :])
        assert _bits_equal(hybrid[bias][: 2 * d], b[bias][: 2 * d])
        assert _bits_equal(hybrid[bias][2 * d :], a[bias][2 * d :])
        assert not torch.equal(hybrid[w], a[w])
    for name in a:
        if "c_attn" not in name:
            assert hybrid[name] is a[name] or _bits_equal(hybrid[name], a[name])
    back = transplant(hybrid, a, pieces)
    assert set(back) == set(a)
    assert all(_bits_equal(back[n], a[n]) for n in a)
    # The inputs were not modified in place.
    assert all(_bits_equal(load_file(tiny_run / "checkpoint-60" / "model.safetensors")[n], a[n]) for n in a)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_one_fused_head_changes_only_its_attention_pattern(kind):
    model_a, model_b = _tiny_model(kind, 0), _tiny_model(kind, 1)
    sd_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    sd_b = model_b.state_dict()
    arch = _arch_of(sd_a, model_a.config)
    block, head = 1, 2
    hybrid = transplant(sd_a, sd_b, qk_pieces(arch, [(block, head)]))
    dh = 8
    if kind == "gpt2":  # Conv1D [d, 3d]: Q head h = columns [h dh, (h+1) dh), K head h = d + the same
        w = f"transformer.h.{block}.attn.c_attn.weight"
        cols = list(range(head * dh, (head + 1) * dh)) + list(range(32 + head * dh, 32 + (head + 1) * dh))
        assert _bits_equal(hybrid[w][:, cols], sd_b[w][:, cols])
        rest = [c for c in range(96) if c not in cols]
        assert _bits_equal(hybrid[w][:, rest], sd_a[w][:, rest])
    else:  # [3d, d] viewed as [n_heads, 3, dh, d]: [h, 0] = Q, [h, 1] = K
        w = f"gpt_neox.layers.{block}.attention.query_key_value.weight"
        hv, av, bv = (t[w].view(4, 3, dh, 32) for t in (hybrid, sd_a, sd_b))
        assert _bits_equal(hv[head, :2], bv[head, :2])
        assert _bits_equal(hv[head, 2], av[head, 2])
        others = [h for h in range(4) if h != head]
        assert _bits_equal(hv[others], av[others])
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    before = _patterns(model_a, sd_a, ids)
    after = _patterns(model_a, hybrid, ids)
    _assert_only_heads_change(before, after, block, {head})


def test_gqa_reports_and_changes_every_query_head_of_the_kv_group():
    model_a, model_b = _tiny_model("llama", 0), _tiny_model("llama", 1)
    sd_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    arch = _arch_of(sd_a, model_a.config)
    assert touched_query_heads(arch, [(0, 1)]) == [(0, 0), (0, 1)]
    assert touched_query_heads(arch, [(0, 2)]) == [(0, 2), (0, 3)]
    assert touched_query_heads(arch, [(0, 0), (0, 3)]) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    hybrid = transplant(sd_a, sd_b, qk_pieces(arch, [(0, 1)]))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert _bits_equal(hybrid[k][:8], sd_b[k][:8]) and _bits_equal(hybrid[k][8:], sd_a[k][8:])  # kv head 0 only
    q = "model.layers.0.self_attn.q_proj.weight"
    assert _bits_equal(hybrid[q][8:16], sd_b[q][8:16]) and _bits_equal(hybrid[q][:8], sd_a[q][:8])
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    before = _patterns(model_a, sd_a, ids)
    after = _patterns(model_a, hybrid, ids)
    _assert_only_heads_change(before, after, 0, {0, 1})

    # Through run_transplant on the live model: the report names the touched heads and proves the copy.
    model_a.load_state_dict(sd_a)
    evaluator = TokenEval(tuple(tuple(r) for r in ids.tolist()))
    donor = evaluate(model_b, evaluator)
    result = run_transplant(model_a, sd_a, sd_b, arch, evaluator, default_conditions(arch, [(0, 1)]), donor)
    row = next(c for c in result.conditions if c["kind"] == "qk")
    assert row["touched_query_heads"] == ["0.0", "0.1"] and row["heads"] == ["0.1"]
    assert row["params_swapped"] == 2 * 8 * 32
    assert result.exact_copy and any("grouped-query" in n for n in result.notes)
    assert all(_bits_equal(model_a.state_dict()[n], sd_a[n]) for n in sd_a)  # A again on return


def test_transplant_detects_a_copy_that_is_not_exact(tiny_run):
    """The proof reads the live model: a parameter nudged outside the swapped slices fails it."""
    ckpt_a = discover_run(tiny_run / "checkpoint-60").checkpoints[-1]
    model = load_model(ckpt_a)
    a = load_file(tiny_run / "checkpoint-60" / "model.safetensors")
    b = load_file(tiny_run / "checkpoint-30" / "model.safetensors")
    arch = resolve_architecture({k: tuple(v.shape) for k, v in a.items()}, ckpt_a.config())
    evaluator = TaskEval(task_from_checkpoint_dir(tiny_run / "checkpoint-60"))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    result = run_transplant(model, a, b, arch, evaluator, default_conditions(arch, [(0, 0)], control=False),
                            evaluate(model, evaluator))
    assert not result.exact_copy
    assert all(c["swapped_equal_B"] for c in result.conditions)


# ---------------------------------------------------------------------------------------------- slack


def test_slack_clean_cell_equals_plain_model(tiny_run):
    ckpt = discover_run(tiny_run / "checkpoint-60").checkpoints[-1]
    model = load_model(ckpt)
    task = task_from_checkpoint_dir(tiny_run / "checkpoint-60")
    _, plain_acc = task.evaluate(model, "validation")
    margins = []
    with torch.no_grad():
        for batch in task.eval_batches("validation"):
            z = model(input_ids=batch["input_ids"]).logits[:, -1, : task.p].double()
            y = batch["labels"]
            top2 = z.topk(2, dim=1)
            best_other = torch.where(top2.indices[:, 0] == y, top2.values[:, 1], top2.values[:, 0])
            margins.append(z[torch.arange(len(y)), y] - best_other)
    plain_margin = torch.cat(margins).mean().item()
    result = run_slack(model, TaskEval(task), alphas=(1.0, 0.5), sigmas=(0.0, 2.0), seed=3)
    assert result.accuracy[0, 0] == pytest.approx(plain_acc, abs=1e-12)
    assert result.margin[0, 0] == pytest.approx(plain_margin, rel=1e-9, abs=1e-9)
    # The hook sits after the final norm: the tied, bias-free unembedding is linear, so scaling h by alpha
    # scales every logit by alpha (a hook before the norm would be normalised away).
    assert result.margin[1, 0] == pytest.approx(0.5 * plain_margin, rel=1e-5, abs=1e-6)
    assert result.accuracy[1, 0] == pytest.approx(plain_acc, abs=1e-12)
    assert result.site == "transformer.ln_f"
    assert result.margin[0, 1] != result.margin[0, 0]
    again = run_slack(model, TaskEval(task), alphas=(1.0, 0.5), sigmas=(0.0, 2.0), seed=3)
    assert np.array_equal(again.margin, result.margin) and np.array_equal(again.accuracy, result.accuracy)
    # The model is left without hooks.
    assert task.evaluate(model, "validation")[1] == plain_acc


@pytest.mark.parametrize("batch_size", [53, 4096])  # one batch or five: the unit is the sequence either way
def test_slack_standard_errors_over_sequences_by_hand(tiny_run, batch_size):
    """accuracy_se / margin_se / loss_se of the clean cell against per-answer correctness, margins and
    cross-entropies of the plain model computed here (the task has one answer per sequence, so the error is the
    std (ddof 1) of those over sqrt(n)); the noised cell has an error of its own."""
    ckpt = discover_run(tiny_run / "checkpoint-60").checkpoints[-1]
    model = load_model(ckpt)
    task = task_from_checkpoint_dir(tiny_run / "checkpoint-60")
    cols = [[], [], []]  # correct, margin, cross-entropy per answer
    with torch.no_grad():
        for batch in task.eval_batches("validation"):
            z = model(input_ids=batch["input_ids"]).logits[:, -1, : task.p].double()
            y = batch["labels"]
            cols[0] += (z.argmax(1) == y).double().tolist()
            cols[1] += margins_of(z, y).tolist()
            cols[2] += torch.nn.functional.cross_entropy(z, y, reduction="none").tolist()
    n = len(cols[0])
    result = run_slack(model, TaskEval(task, batch_size=batch_size), alphas=(1.0,), sigmas=(0.0, 2.0), seed=3)
    assert result.n_units == n == result.n
    for col, se in zip(cols, (result.accuracy_se, result.margin_se, result.loss_se), strict=True):
        assert se.shape == (1, 2)
        assert se[0, 0] == pytest.approx(np.std(col, ddof=1) / np.sqrt(n), rel=1e-6)
        assert np.isfinite(se[0, 1]) and se[0, 1] > 0 and se[0, 1] != se[0, 0]
    doc = result.to_json()
    assert doc["accuracy_se"] == result.accuracy_se.tolist() and doc["n_units"] == n


def test_ratio_se_over_unequal_units_by_hand():
    """Sequences with several answers each (text data): the linearised ratio error written out here."""
    from ckptaudit.analyses.gxs.evaluation import ratio_se

    rng = np.random.default_rng(0)
    k = rng.integers(1, 9, size=12).astype(float)
    y = np.stack([rng.binomial(k.astype(int), 0.4), rng.normal(size=12) * k], axis=1)  # [12, 2]
    R = y.sum(0) / k.sum()
    want = np.sqrt(12 / 11 * ((y - R * k[:, None]) ** 2).sum(0)) / k.sum()
    np.testing.assert_allclose(ratio_se(y, k), want, rtol=1e-12)
    assert ratio_se(y[:1], k[:1]) is None


def test_margins_of_matches_definition():
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 4.5]])
    assert margins_of(z, torch.tensor([1, 2])).tolist() == [1.0, -0.5]


# ------------------------------------------------------------------------------------------- velocity


def test_velocity_matches_brute_force(tiny_run):
    run = discover_run(tiny_run)
    result = run_velocity(run)
    first = run.checkpoints[0]
    arch = resolve_architecture({k: tuple(v.shape) for k, v in load_file(first.weight_files[0]).items()},
                                first.config())
    flat: dict[str, list[np.ndarray]] = {"G": [], "S": []}
    for c in run.checkpoints:
        sd = load_file(c.weight_files[0])
        for g in ("G", "S"):
            pieces = [p for p in arch.select(GROUPS[g]) if p.block is not None]
            flat[g].append(np.concatenate([p.take(sd[p.tensor]).double().numpy().ravel() for p in pieces]))
    steps = [c.step for c in run.checkpoints]
    for g, got in (("G", result.velocity_G), ("S", result.velocity_S)):
        want = [np.linalg.norm(flat[g][i] - flat[g][i - 1]) / (steps[i] - steps[i - 1]) for i in range(1, len(steps))]
        np.testing.assert_allclose(got, want, rtol=1e-9)
        nu = np.asarray(want)
        cons = next(steps[i + 1] for i in range(len(nu)) if np.all(nu[i:] < 0.1 * nu.max())) \
            if np.any(nu < 0.1 * nu.max()) and nu[-1] < 0.1 * nu.max() else None
        assert (result.consolidation_step_G if g == "G" else result.consolidation_step_S) == cons
    assert list(result.steps) == steps[1:]
    assert result.order in ("G first", "S first", "together", "G only", "S only", "neither")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_transplant_json_and_report(tiny_run, tmp_path):
    out = tmp_path / "t.h5"
    r = invoke("gxs", "transplant", str(tiny_run / "checkpoint-60"), str(tiny_run / "checkpoint-30"),
               "--heads", "1.2", "--device", "cpu", "--json", "--out", str(out))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {"conditions", "baseline_accuracy", "exact_copy"} <= set(s)
    assert s["exact_copy"] is True
    names = [c["name"] for c in s["conditions"]]
    assert names == ["A (baseline)", "swap heads 1.2", "control: S of B"]
    for c in s["conditions"]:
        assert {"name", "heads", "params_swapped", "accuracy", "loss"} <= set(c)
    assert s["conditions"][1]["params_swapped"] == 2 * (32 * 8 + 8)  # Q and K of one head, weights and biases
    with h5py.File(out) as f:
        assert "gxs/transplant/conditions/1" in f
        assert f["gxs/transplant"].attrs["exact_copy"]


def test_cli_transplant_different_shapes_exits_2(tiny_run, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=25, n_positions=4)).save_pretrained(other)
    r = invoke("gxs", "transplant", str(tiny_run / "checkpoint-60"), str(other), "--no-report",
               "--device", "cpu")
    assert r.exit_code == 2
    assert "not the same architecture and shape" in r.output


def test_cli_velocity_and_slack_json(tiny_run):
    r = invoke("gxs", "velocity", str(tiny_run), "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {"steps", "velocity_G", "velocity_S", "consolidation_step_G", "consolidation_step_S", "order"} <= set(s)
    assert len(s["velocity_G"]) == len(s["steps"]) == 6
    r = invoke("gxs", "slack", str(tiny_run / "checkpoint-60"), "--alpha", "1,0.5", "--sigma", "0,1",
               "--json", "--no-report", "--device", "cpu", "--seed", "1")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {"alpha", "sigma", "accuracy", "margin"} <= set(s)
    assert np.asarray(s["accuracy"]).shape == (2, 2) and len(s["no_gain_reflex"]) == 2


@pytest.mark.parametrize("command", ["transplant", "slack"])
def test_bad_token_data_is_one_line_error_in_both_commands(tiny_run, tmp_path, command):
    """--data that does not fit the model (an id past its vocabulary; with --as-given a sequence past its positions;
    a binary file) is a one-line error with exit 2 in transplant as in slack, never an index crash. Without
    --as-given a long sequence is cut into windows and evaluated."""
    ckpt = tiny_run / "checkpoint-60"
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    n_pos = json.loads((ckpt / "config.json").read_text())["n_positions"]
    (tmp_path / "ids.json").write_text(json.dumps([[0, 1, vocab + 5]]))
    (tmp_path / "long.json").write_text(json.dumps([[1] * (n_pos + 3), [2] * (n_pos + 3)]))
    (tmp_path / "ids.npy").write_bytes(bytes(range(256)))
    args = ["gxs", command, str(ckpt)] + ([str(tiny_run / "checkpoint-30")] if command == "transplant" else [])
    cases = [("ids.json", [], "outside the model's vocabulary"), ("ids.json", ["--as-given"], f"token id {vocab + 5}"),
             ("long.json", ["--as-given"], f"{n_pos + 3} tokens"), ("ids.npy", [], "not UTF-8 text")]
    for name, extra, needle in cases:
        r = invoke(*args, "--data", str(tmp_path / name), *extra, "--no-report", "--device", "cpu")
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("ckptaudit: error:") and needle in r.stderr, (name, extra, r.stderr)
        assert "\n" not in r.stderr.strip() and "Traceback" not in r.output
    r = invoke(*args, "--data", str(tmp_path / "long.json"), "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_as_given_evaluates_each_sequence_whole_windows_cut_them(tiny_run, tmp_path):
    """--as-given: every sequence evaluated as it is (next-token prediction at each of its positions); the default
    cuts the same file into --seq-len windows. Both against a brute-force next-token count over the model's own
    logits, sequence by sequence."""
    ckpt_dir = tiny_run / "checkpoint-60"
    ckpt = discover_run(ckpt_dir).checkpoints[-1]
    model = load_model(ckpt)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 20, size=n).tolist() for n in (4, 3, 4, 2, 4, 3, 4, 4, 3, 4, 2, 4) * 2]  # the model takes 4
    (tmp_path / "s.json").write_text(json.dumps(seqs))

    def brute(rows):
        hits = count = 0
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r])
                hits += int((model(input_ids=ids).logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
                count += len(r) - 1
        return hits / count, count

    base = ["gxs", "slack", str(ckpt_dir), "--alpha", "1", "--sigma", "0", "--data", str(tmp_path / "s.json"),
            "--json", "--no-report", "--device", "cpu"]
    r = invoke(*base, "--as-given")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    acc, n = brute(seqs)
    assert doc["n"] == n and doc["accuracy"][0][0] == pytest.approx(acc)
    r = invoke(*base, "--seq-len", "3")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    windows = [s[i : i + 3] for s in seqs for i in range(0, len(s), 3) if len(s[i : i + 3]) >= 2]
    validation = windows[len(windows) - max(1, len(windows) // 10):]  # the last 10% of the windows
    acc, n = brute(validation)
    assert doc["n"] == n and doc["accuracy"][0][0] == pytest.approx(acc)
    assert doc["eval_data"]["validation"]["windows_used"] == len(validation)


def test_npy_and_json_token_data_give_the_same_slack(tiny_run, tmp_path):
    """The same sequences as a .npy array and as JSON lists are the same evaluation set."""
    ckpt = tiny_run / "checkpoint-60"
    ids = np.random.default_rng(0).integers(0, 20, size=(6, 4))
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    docs = []
    for name in ("ids.npy", "ids.json"):
        r = invoke("gxs", "slack", str(ckpt), "--alpha", "1,0.5", "--sigma", "0", "--data",
                   str(tmp_path / name), "--json", "--no-report", "--device", "cpu")
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.stdout))
    assert docs[0]["accuracy"] == docs[1]["accuracy"] and docs[0]["loss"] == docs[1]["loss"]


def test_velocity_steps_subset_keeps_the_runs_anchor(tiny_run):
    r = invoke("gxs", "velocity", str(tiny_run), "--steps", "30:60", "--json", "--no-report",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["anchor_step"] == 0 and doc["steps"] == [30, 40, 50, 60]


def _planted_velocity_run(root, tiny_run, schedule: dict[str, list[float]]) -> list[int]:
    """A run of the tiny model's first checkpoint whose G and S pieces move by ``schedule[g][i]`` (Frobenius norm,
    over all the group's block pieces) from checkpoint i to i + 1, ten steps apart; everything else stays put."""
    first = discover_run(tiny_run).checkpoints[0]
    sd = load_file(first.weight_files[0])
    arch = resolve_architecture({k: tuple(v.shape) for k, v in sd.items()}, first.config())
    gen = torch.Generator().manual_seed(11)
    pieces = {g: [p for p in arch.select(GROUPS[g]) if p.block is not None] for g in schedule}
    dirs = {g: [torch.randn(p.take(sd[p.tensor]).shape, generator=gen, dtype=torch.float64) for p in pieces[g]]
            for g in schedule}
    for g in dirs:  # one unit direction over the whole group
        norm = float(torch.sqrt(sum((d * d).sum() for d in dirs[g])))
        dirs[g] = [d / norm for d in dirs[g]]
    n = len(next(iter(schedule.values()))) + 1
    steps = [10 * i for i in range(n)]
    for i, step in enumerate(steps):
        state = {k: v.clone() for k, v in sd.items()}
        for g in schedule:
            moved = sum(schedule[g][:i])
            for p, d in zip(pieces[g], dirs[g], strict=True):
                p.put(state[p.tensor], (p.take(sd[p.tensor]).double() + moved * d).to(sd[p.tensor].dtype))
        write_checkpoint(root / f"checkpoint-{step}", state, json.loads(first.config_file.read_text()))
    return steps


@pytest.mark.parametrize(("g_moves", "s_moves", "order", "cons_g", "cons_s"), [
    ([1, 1, 1, 0.01, 0.01, 0.01, 0.01, 0.01], [1, 1, 1, 1, 1, 0.01, 0.01, 0.01], "G first", 40, 60),
    ([1, 1, 1, 1, 1, 1, 0.01, 0.01], [1, 1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], "S first", 70, 30),
    ([1, 1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], [1, 1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], "together", 30, 30),
    ([1, 1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], [1, 0.01, 1, 0.01, 0.5, 0.5, 0.5, 1], "G only", 30, None),
])  # fmt: skip
def test_velocity_order_of_a_constructed_series(tmp_path, tiny_run, g_moves, s_moves, order, cons_g, cons_s):
    """G and S moved by planted amounts per ten steps: the velocities are those amounts / 10, the consolidation
    step is the first after which every velocity stays under a tenth of the peak, and ``order`` follows."""
    steps = _planted_velocity_run(tmp_path / "run", tiny_run, {"G": g_moves, "S": s_moves})
    result = run_velocity(discover_run(tmp_path / "run"))
    assert list(result.steps) == steps[1:]
    np.testing.assert_allclose(result.velocity_G, np.array(g_moves) / 10, rtol=1e-3)
    np.testing.assert_allclose(result.velocity_S, np.array(s_moves) / 10, rtol=1e-3)
    assert (result.consolidation_step_G, result.consolidation_step_S, result.order) == (cons_g, cons_s, order)
