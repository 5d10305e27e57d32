"""born-gap observables (SPEC §6) against explicit density matrices and brute-force sums."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptaudit.analyses.born_gap import (
    Context,
    born_gap,
    born_observables,
    load_contexts,
    nucleus_pool,
)
from ckptaudit.errors import DataError

FIXTURE = Path(__file__).resolve().parent.parent / "ckptaudit" / "data" / "near_synonyms.jsonl"
PAPER_PAIRS = [("skepticism", "suspicion"), ("shame", "guilt"), ("ashes", "rubble"), ("longing", "yearning"),
               ("remorse", "guilt"), ("relief", "joy"), ("awe", "wonder"), ("purpose", "meaning"),
               ("terror", "fear"), ("shock", "horror")]


def _case(seed: int, V: int = 40, d: int = 6, temp: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 3 / temp
    U = torch.randn(V, d, generator=g, dtype=torch.float64)
    return torch.softmax(z, 0), z, U


def _reference(p, U, pool, y, c):
    """Everything by explicit loops / an explicitly built density matrix (numpy, float64)."""
    pool = [int(t) for t in pool]
    w = np.array([float(p[t]) for t in pool])
    w /= w.sum()
    E = U.numpy()[pool]
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    n = len(pool)
    rho = sum(w[i] * np.outer(E[i], E[i]) for i in range(n))
    iy, ic = pool.index(y), pool.index(c)
    cos = lambda i, j: float(E[i] @ E[j])  # noqa: E731
    born = np.array([E[k] @ rho @ E[k] for k in range(n)])
    U_all = U.numpy() / np.linalg.norm(U.numpy(), axis=1, keepdims=True)
    born_all = np.array([sum(w[i] * float(E[i] @ U_all[k]) ** 2 for i in range(n)) for k in range(len(U_all))])
    xi2 = sum(w[i] * w[j] * math.acos(max(-1.0, min(1.0, cos(i, j)))) ** 2 for i in range(n) for j in range(n)
              if i != j)
    signal = (1 - cos(iy, ic) ** 2) * (w[iy] - w[ic])
    drag = sum(w[i] * (cos(i, iy) ** 2 - cos(i, ic) ** 2) for i in range(n) if i not in (iy, ic))
    wa = w.copy()
    wa[ic] = 0
    wa /= wa.sum()
    rho_a = sum(wa[i] * np.outer(E[i], E[i]) for i in range(n))
    return {
        "w": w, "born": born, "phi": born[iy] - born[ic], "signal": signal, "drag": drag,
        "purity": float(np.trace(rho @ rho)), "ipr": float((w ** 2).sum()), "xi": math.sqrt(xi2),
        "burial": math.sqrt(xi2) / math.acos(cos(iy, ic)),
        "eta_geo": cos(iy, ic) ** 2 / sum(cos(i, iy) ** 2 for i in range(n) if i != iy),
        # ranks over the whole vocabulary: P_B(k) = sum_i w_i c_ik^2 for every token k, p over every token
        "born_rank": 1 + sum(born_all[k] > born_all[y] for k in range(len(U_all))),
        "softmax_rank": 1 + sum(float(p[k]) > float(p[y]) for k in range(len(U_all))),
        "phi_ablated": float(E[iy] @ rho_a @ E[iy] - E[ic] @ rho_a @ E[ic]),
    }


# ------------------------------------------------------------------------------------------------ observables


@pytest.mark.parametrize("seed", range(8))
def test_phi_equals_signal_plus_drag(seed):
    p, z, U = _case(seed, V=300, d=16, temp=0.5)
    o = born_observables(p, z, U, target=seed + 3, competitor=seed + 50, nucleus=0.95)
    assert abs(o.phi - (o.signal + o.drag)) < 1e-12
    assert o.decomposition_residual < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_against_explicit_density_matrix(seed):
    p, z, U = _case(seed, V=40, d=5)
    y, c = 7, 11
    o = born_observables(p, z, U, target=y, competitor=c, nucleus=0.8)
    ref = _reference(p, U, o.pool, y, c)
    assert np.allclose(o.p_pool, ref["w"], atol=1e-14)
    assert np.allclose(o.born_scores, ref["born"], atol=1e-12)  # <e_k|rho|e_k>
    assert o.purity == pytest.approx(ref["purity"], abs=1e-12)  # tr(rho^2)
    assert o.pr == pytest.approx(1 / ref["purity"], rel=1e-12)
    assert o.ipr == pytest.approx(ref["ipr"], abs=1e-14) and o.purity >= o.ipr
    assert o.phi == pytest.approx(ref["phi"], abs=1e-12)
    assert o.signal == pytest.approx(ref["signal"], abs=1e-12)
    assert o.drag == pytest.approx(ref["drag"], abs=1e-12)
    assert o.xi == pytest.approx(ref["xi"], abs=1e-9)
    assert o.burial_depth == pytest.approx(ref["burial"], rel=1e-9)
    assert o.eta_geo == pytest.approx(ref["eta_geo"], rel=1e-10)
    assert (o.born_rank, o.softmax_rank) == (ref["born_rank"], ref["softmax_rank"])
    assert o.phi_ablated == pytest.approx(ref["phi_ablated"], abs=1e-12)
    assert o.logit_gap == pytest.approx(float(z[y] - z[c]))
    assert o.throttle == pytest.approx(1 - o.c_yc ** 2)


def test_nucleus_pool_is_smallest_top_set_plus_forced():
    p, _, _ = _case(3, V=50)
    order = np.argsort(-p.numpy(), kind="stable")
    cum = np.cumsum(p.numpy()[order])
    k = int(np.argmax(cum >= 0.7)) + 1
    pool = nucleus_pool(p, 0.7, forced=[int(order[-1]), int(order[0])])
    assert pool.tolist() == [int(t) for t in order[:k]] + [int(order[-1])]
    assert nucleus_pool(p, 1.0).numel() == 50
    with pytest.raises(DataError):
        nucleus_pool(p, 0.0)


def test_competitor_defaults_to_nearest_pool_token():
    p, z, U = _case(4, V=30, d=4)
    o = born_observables(p, z, U, target=2, nucleus=0.9)
    En = U / U.norm(dim=1, keepdim=True)
    cands = [int(t) for t in o.pool if int(t) != 2]
    best = max(cands, key=lambda j: float(En[2] @ En[j]))
    assert o.competitor == best and not o.competitor_given


def test_near_synonym_split_looks_pure():
    """Paper 002 §2.4: mass split evenly between two near-parallel tokens gives purity ~ 1, IPR = 1/2."""
    U = torch.tensor([[1.0, 0.0, 0.0], [0.995, 0.0998749, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([0.0, 0.0, -50.0], dtype=torch.float64)
    o = born_observables(torch.softmax(z, 0), z, U, target=0, competitor=1, nucleus=0.99)
    assert o.pool_size == 2 and o.ipr == pytest.approx(0.5)
    assert o.purity == pytest.approx(0.5 + 0.5 * 0.995 ** 2, rel=1e-6)
    assert o.phi == pytest.approx(0.0, abs=1e-12) and o.burial_depth == pytest.approx(1 / math.sqrt(2), rel=1e-6)  # xi^2 = 2 (1/4) theta^2


# ------------------------------------------------------------------------------------------------ contexts


def test_shipped_fixture_has_the_papers_ten_pairs():
    ctx = load_contexts(FIXTURE)
    assert [(c.target.strip(), c.competitor.strip()) for c in ctx] == PAPER_PAIRS
    for c in ctx:
        assert c.target.startswith(" ") and c.competitor.startswith(" ")
        assert not c.context.endswith(" ") and len(c.context.split()) >= 8


def test_load_contexts_errors_name_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"context": "a b", "target": " c"}\n\n{"context": "x", "target": 3}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:3: 'target'"):
        load_contexts(f)
    f.write_text('{"context": "a b", "target": " c"}\n{oops\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: invalid JSON"):
        load_contexts(f)
    f.write_text('{"context": "a", "target": " b", "competitr": " c"}\n')
    with pytest.raises(DataError, match="unknown keys"):
        load_contexts(f)
    f.write_text('{"context": "a", "target": " b"}\n')
    assert load_contexts(f) == [Context("a", " b", None)]


# ------------------------------------------------------------------------------------------------ tiny model

WORDS = ["She", "felt", "a", "quiet", "deep", "sense", "of", "longing", "yearning", "guilt", "shame", "ice",
         "cream", "the", "hills", "."]


def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for w in WORDS:
        for form in (w, " " + w):
            vocab.setdefault(form, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # GPT-2 style pieces: a word with its leading space is one token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[^A-Za-z\s]+"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _model(vocab_size: int, tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     tie_word_embeddings=tied)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_born_gap_on_tiny_gpt2(tied):
    tok = _tokenizer()
    assert tok.encode(" longing", add_special_tokens=False) == [tok.convert_tokens_to_ids(" longing")]
    model = _model(len(tok), tied)
    ctxs = [Context("She felt a quiet", " longing", " yearning"), Context("She felt a deep sense of", " shame")]
    res = born_gap(model, tok, ctxs, nucleus=0.5)
    assert res.unembedding.startswith("input_embeddings" if tied else "lm_head")
    rows = model.transformer.wte.weight if tied else model.lm_head.weight
    assert tied == torch.equal(model.transformer.wte.weight, model.lm_head.weight)
    for ctx, o in zip(ctxs, res.observables, strict=True):
        ids = torch.tensor([tok.encode(ctx.context, add_special_tokens=False)])
        with torch.no_grad():
            z = model(input_ids=ids).logits[0, -1].double()
        p = torch.softmax(z, 0)
        y = tok.convert_tokens_to_ids(ctx.target)
        ref = _reference(p, rows.detach().double(), o.pool, y, o.competitor)
        assert o.target == y and o.phi == pytest.approx(ref["phi"], abs=1e-10)
        assert o.purity == pytest.approx(ref["purity"], abs=1e-10)
        assert o.xi == pytest.approx(ref["xi"], abs=1e-8)
        assert abs(o.phi - o.signal - o.drag) < 1e-12
    assert res.observables[0].competitor == tok.convert_tokens_to_ids(" yearning")
    j = res.to_json()
    assert list(j["contexts"][0]) == ["context", "target", "competitor", "pool_size", "phi", "signal", "drag",
                                      "throttle", "logit_gap", "purity", "pr", "ipr", "xi", "burial_depth",
                                      "eta_geo", "born_rank", "softmax_rank", "phi_ablated"]
    assert j["contexts"][1]["competitor"] == tok.decode([res.observables[1].competitor])
    json.dumps(j)
    tree = res.to_hdf5_tree()
    assert tree["contexts"][0]["pool"].dtype == np.int64


def test_multi_token_or_unknown_target_is_an_error_naming_it():
    tok = _tokenizer()
    model = _model(len(tok), True)
    with pytest.raises(DataError, match=r"target ' ice cream' is 2 tokens"):
        born_gap(model, tok, [Context("She felt a", " ice cream")])
    with pytest.raises(DataError, match=r"competitor ' wistfulness' is the unknown token"):
        born_gap(model, tok, [Context("She felt a", " longing", " wistfulness")])


def test_ranks_count_the_whole_vocabulary_not_only_the_pool():
    """A target forced into a small pool with little probability: its ranks exceed the pool size, as counted by
    brute force over every token."""
    p, z, U = _case(4, V=60, d=6, temp=0.3)
    y = int(torch.argsort(p)[5])  # among the least likely tokens
    o = born_observables(p, z, U, target=y, nucleus=0.5)
    assert o.pool_size < 10
    ref = _reference(p, U, o.pool, y, o.competitor)
    assert o.softmax_rank == ref["softmax_rank"] == 1 + int((p > p[y]).sum()) > o.pool_size
    assert o.born_rank == ref["born_rank"]
    assert born_observables(p, z, U, target=y, nucleus=0.5, vocab_ranks=False).born_rank is None


def test_vocabulary_born_rank_with_a_pool_wider_than_the_embedding():
    """A flat distribution puts most tokens in the pool (|P| > d, so the d x d density matrix is used): the Born
    rank still equals brute force over the vocabulary."""
    p, z, U = _case(6, V=80, d=4, temp=50.0)
    y = 9
    o = born_observables(p, z, U, target=y, nucleus=0.95)
    assert o.pool_size > U.shape[1]
    ref = _reference(p, U, o.pool, y, o.competitor)
    assert (o.born_rank, o.softmax_rank) == (ref["born_rank"], ref["softmax_rank"])


def test_context_longer_than_the_model_positions_is_refused_before_running():
    """n_positions = 32: a 33-token context would index past the position embeddings (IndexError inside torch)."""
    tok = _tokenizer()
    model = _model(len(tok), True)
    long = " ".join(["She"] * 33)
    assert len(tok.encode(long, add_special_tokens=False)) == 33 > model.config.n_positions
    with pytest.raises(IndexError):  # what the model itself does with it
        with torch.no_grad():
            model(input_ids=torch.tensor([tok.encode(long, add_special_tokens=False)]))
    both = [Context("She felt a", " longing"), Context(long, " longing")]
    with pytest.raises(DataError, match="33 tokens, more than the model's 32 positions"):
        born_gap(model, tok, both, strict=True)
    kept = born_gap(model, tok, both)  # without strict: the long one is skipped, with its reason
    assert [c.context for c in kept.contexts] == ["She felt a"]
    assert "33 tokens, more than the model's 32 positions" in kept.skipped[0]["reason"]
    fits = " ".join(["She"] * 32)
    assert born_gap(model, tok, [Context(fits, " longing")]).observables[0].target == tok.convert_tokens_to_ids(
        " longing")


def test_contexts_file_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"context": "a", "target": " b"}\n{"context": "\xff", "target": " b"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not UTF-8"):
        load_contexts(f)


def test_unusable_contexts_are_skipped_by_line_unless_strict(tiny_run, tmp_path):
    """A contexts file whose second line's target is two tokens for the model's tokenizer: born-gap and
    finetune-probe run the other lines and list line 2 with the reason; --strict stops at it with one line."""
    import json

    from cli_helpers import assert_one_line_error, invoke
    from test_cli_common import build_inputs

    lm = build_inputs(tiny_run, tmp_path / "in")["lm"]
    rows = [{"context": "the old man felt a deep", "target": "longing", "competitor": "yearning"},
            {"context": "the old man felt a deep", "target": "old man", "competitor": "yearning"},
            {"context": "the old man felt", "target": "joy", "competitor": "relief"}]
    f = tmp_path / "ctx.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cmd in (["born-gap", lm, "--contexts", f], ["finetune-probe", lm, "--contexts", f, "--mode", "full",
                                                    "--train-steps", "1"]):
        r = invoke(*cmd, "--device", "cpu", "--json")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert [c["target"] for c in doc["contexts"]] == ["longing", "joy"]
        (skipped,) = doc["skipped_contexts"]
        assert skipped["where"] == f"{f}:2" and skipped["target"] == "old man" and "2 tokens" in skipped["reason"]
        human = invoke(*cmd, "--device", "cpu")
        assert f"skipped {f}:2" in " ".join(human.stdout.split())
        assert_one_line_error(invoke(*cmd, "--device", "cpu", "--strict"), f"{f}:2", "2 tokens")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n")
    assert_one_line_error(invoke("born-gap", lm, "--contexts", bad, "--device", "cpu"), "no usable context", f"{bad}:1")
