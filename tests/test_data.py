"""io/data.py: text / JSONL / .npy data tokenised with a checkpoint's own tokenizer, built-in tasks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm_dir

from ckptaudit.errors import DataError
from ckptaudit.tasks.data import TokenData, WindowSpec, check_enough, load_data

WORDS = [f"w{i}" for i in range(20)]
VOCAB = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": 20, "[EOS]": 21}


def _model_dir(path: Path, tokenizer: bool = True) -> Path:
    """A tiny GPT-2 (16 positions) with a WordLevel tokenizer over VOCAB beside it."""
    return make_tiny_lm_dir(path, VOCAB, unk="[UNK]", eos="[EOS]", n_embd=8, n_layer=1, n_head=2, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from ckptaudit.io.discover import discover_run

    return discover_run(_model_dir(tmp_path_factory.mktemp("model")))[0]


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    from ckptaudit.io.discover import discover_run

    return discover_run(_model_dir(tmp_path_factory.mktemp("bare"), tokenizer=False))[0]


def _ids(words: list[str]) -> list[int]:
    return [VOCAB[w] for w in words]


def _window_ids(d: TokenData) -> list[list[int]]:
    return [d.windows.ids(w).tolist() for w in range(len(d.windows))]


def test_plain_text_is_one_document_cut_into_windows(ckpt, tmp_path):
    words = [WORDS[(3 * i) % 20] for i in range(100)]
    f = tmp_path / "a.txt"
    f.write_text(" ".join(words[:50]) + "\n" + " ".join(words[50:]) + "\n")
    d = load_data(ckpt, data=f, seq_len=8)
    assert isinstance(d, TokenData) and d.seq_len == 8 and d.n_tokens == 100 and d.kind == "text"
    ids = _ids(words)
    # 12 full windows and the document's last 4 tokens as a 13th, shorter one
    assert _window_ids(d) == [ids[i : i + 8] for i in range(0, 100, 8)]
    assert d.split_size("train") == 12 and d.split_size("validation") == 1  # the last 10% (at least one)
    assert load_data(ckpt, data=f).seq_len == 16  # default: the model's context (16), at most 512


def test_jsonl_documents_never_share_a_window_unless_packed(ckpt, tmp_path):
    f = tmp_path / "a.jsonl"
    docs = [" ".join(WORDS[i : i + 5]) for i in range(0, 15, 5)]
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n")
    eos = VOCAB["[EOS]"]
    per_doc = [_ids(t.split()) + [eos] for t in docs]  # 6 tokens each, EOS-terminated
    d = load_data(ckpt, data=f, seq_len=4)
    assert d.n_tokens == 18 and d.kind == "jsonl-text"
    assert _window_ids(d) == [w for doc in per_doc for w in (doc[:4], doc[4:])]
    assert list(d.windows.doc) == [0, 0, 1, 1, 2, 2]
    packed = load_data(ckpt, data=f, windows=WindowSpec(seq_len=4, pack=True))
    stream = [t for doc in per_doc for t in doc]
    assert _window_ids(packed) == [stream[i : i + 4] for i in range(0, 16, 4)]  # 18 // 4 windows, tail dropped


def test_token_id_files_of_every_kind_give_the_same_windows(ckpt, tmp_path):
    docs = [list(range(1, 10)), list(range(10, 14))]
    np.save(tmp_path / "rows.npy", np.array([docs[0][:4], docs[1]]))
    (tmp_path / "ids.json").write_text(json.dumps(docs))
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": docs[0]}) + "\n" + json.dumps(docs[1]) + "\n")
    want = [docs[0][0:4], docs[0][4:8], docs[1]]  # the single token 9 makes no window
    for name in ("ids.json", "ids.jsonl"):
        assert _window_ids(load_data(ckpt, data=tmp_path / name, seq_len=4)) == want, name
    assert _window_ids(load_data(ckpt, data=tmp_path / "rows.npy", seq_len=4)) == [docs[0][:4], docs[1]]
    f1 = tmp_path / "ids.npy"
    np.save(f1, np.arange(40, dtype=np.int32) % 20)
    d = load_data(ckpt, data=f1, seq_len=10)
    assert _window_ids(d) == np.arange(40).reshape(4, 10).__mod__(20).tolist()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 2, 99] * 10))
    with pytest.raises(DataError, match="vocabulary"):
        load_data(ckpt, data=bad, seq_len=4)


def test_batches_are_deterministic_and_loss_is_next_token_ce(ckpt, tmp_path):
    from ckptaudit.io.models import load_model

    f = tmp_path / "ids.npy"
    np.save(f, np.random.default_rng(0).integers(0, 20, 16 * 40))  # 40 distinct windows
    d = load_data(ckpt, data=f, seq_len=16)
    a, b = d.batch("train", 1, 4, seed=5), d.batch("train", 1, 4, seed=5)
    assert torch.equal(a["input_ids"], b["input_ids"])
    epoch = torch.cat([d.batch("train", i, 4, seed=5)["input_ids"] for i in range(9)])  # 36 train windows
    assert len({tuple(r.tolist()) for r in epoch}) == 36
    model = load_model(ckpt)
    loss, acc = d.loss_and_accuracy(model, a)
    with torch.no_grad():
        logits = model(input_ids=a["input_ids"]).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ref = -logp.gather(-1, a["input_ids"][:, 1:, None]).mean()
        hits = (logits[:, :-1].argmax(-1) == a["input_ids"][:, 1:]).double().mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert acc == pytest.approx(float(hits))
    vloss, vacc = d.evaluate(model, "validation")
    with torch.no_grad():
        rows = torch.stack([torch.from_numpy(d.windows.ids(int(w))) for w in d.validation])
        lg = model(input_ids=rows).logits.double()
        vref = -torch.log_softmax(lg[:, :-1], -1).gather(-1, rows[:, 1:, None]).mean()
    assert vloss == pytest.approx(float(vref), rel=1e-6)


def test_padded_windows_count_only_real_predictions(ckpt, tmp_path):
    """Windows of unequal length share a batch right-padded; the loss is the mean over real next-token predictions,
    the same as evaluating each window alone."""
    from ckptaudit.io.models import load_model

    f = tmp_path / "ids.jsonl"
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13], [3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5], [8, 9, 7, 9]] * 2
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_data(ckpt, data=f, seq_len=8)
    model = load_model(ckpt)
    batch = d.collate(list(range(5)))
    assert batch["input_ids"].shape == (5, 8) and int((batch["labels"] == -100).sum()) == 5 * 8 - sum(map(len, rows[:5]))
    loss, _ = d.loss_and_accuracy(model, batch)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows[:5]:
            ids = torch.tensor([r])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(lp.gather(-1, ids[0, 1:, None]).sum())
            count += len(r) - 1
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)


def test_eval_cap_selects_seeded_windows_and_says_so(ckpt, tmp_path):
    f = tmp_path / "ids.npy"
    np.save(f, np.random.default_rng(1).integers(0, 20, 8 * 400))  # 400 windows of 8, 40 in validation
    full = load_data(ckpt, data=f, windows=WindowSpec(seq_len=8, eval_tokens=None))
    capped = load_data(ckpt, data=f, windows=WindowSpec(seq_len=8, eval_tokens=100, seed=3))
    assert full.split_size("validation") == 40 and capped.split_size("validation") == 12  # 12 * 8 <= 100 < 13 * 8
    sel = capped.selection()["validation"]
    assert sel["capped"] and sel["windows_used"] == 12 and sel["windows_in_split"] == 40 and sel["tokens_used"] == 96
    assert set(sel["windows"]) <= set(range(360, 400)) and sel["windows"] == sorted(sel["windows"])
    again = load_data(ckpt, data=f, windows=WindowSpec(seq_len=8, eval_tokens=100, seed=3))
    other = load_data(ckpt, data=f, windows=WindowSpec(seq_len=8, eval_tokens=100, seed=4))
    assert again.selection() == capped.selection() and other.selection()["validation"]["windows"] != sel["windows"]
    assert not full.selection()["validation"]["capped"]
    train = load_data(ckpt, data=f, windows=WindowSpec(seq_len=8, train_tokens=80))
    assert train.split_size("train") == 10 and train.selection()["train"]["capped"]


def test_empty_file_and_too_few_tokens(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        load_data(ckpt, data=empty)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(DataError, match="short.txt.*1 window"):
        load_data(ckpt, data=short, seq_len=16)
    f = tmp_path / "some.npy"
    np.save(f, np.arange(16 * 20) % 20)
    d = load_data(ckpt, data=f, seq_len=16)
    with pytest.raises(DataError, match=r"some.npy.*need 64 train windows") as err:
        check_enough(d, n_batches=8, batch_size=8)
    assert "tokens" in str(err.value)
    check_enough(d, n_batches=2, batch_size=8)  # 18 train sequences are enough for 16


def test_text_without_tokenizer_says_how_to_fix(bare_ckpt, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("w1 w2 w3 " * 20)
    with pytest.raises(DataError, match="tokenizer") as err:
        load_data(bare_ckpt, data=f)
    assert "save_pretrained" in str(err.value) and ".npy" in str(err.value)
    np.save(tmp_path / "ids.npy", np.arange(64) % 20)  # token ids need no tokenizer
    assert load_data(bare_ckpt, data=tmp_path / "ids.npy").seq_len == 16


def test_tasks_recorded_named_and_unknown(tiny_checkpoint, bare_ckpt, tmp_path):
    from ckptaudit.io.discover import discover_run

    ckpt = discover_run(tiny_checkpoint)[0]
    assert load_data(ckpt).p == 23  # ckptaudit_task.json
    assert load_data(ckpt, task="modadd:p=23,train_frac=0.3").train_frac == 0.3
    with pytest.raises(DataError, match="vocabulary has 9 tokens.*25.*modadd:p=23"):
        load_data(ckpt, task="modadd:p=7")  # another task than the model's
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        load_data(ckpt, task="nope")
    with pytest.raises(DataError, match="ckptaudit_task.json"):
        load_data(bare_ckpt)
    with pytest.raises(DataError, match="not both"):
        load_data(ckpt, task="modadd", data=tmp_path / "x.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        load_data(bare_ckpt, data=bad)


# ------------------------------------------------------------------------------------- whole sequences (gxs)


def test_sequences_from_every_format_are_the_same_ids(ckpt, tmp_path):
    """load_sequences keeps one sequence per entry, whatever the format: the ids written by hand come back."""
    from ckptaudit.tasks.data import load_sequences

    docs = [["w1", "w2", "w3"], ["w4", "w5"], ["w6", "w7", "w8", "w9"]]
    want = [tuple(_ids(d)) for d in docs]
    (tmp_path / "a.txt").write_text("\n".join(" ".join(d) for d in docs) + "\n\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": " ".join(d)}) + "\n" for d in docs))
    (tmp_path / "ids.json").write_text(json.dumps([list(w) for w in want]))
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": list(want[0])}) + "\n"
                                         + "".join(json.dumps(list(w)) + "\n" for w in want[1:]))
    for name in ("a.txt", "t.jsonl", "ids.json", "ids.jsonl"):
        assert load_sequences(ckpt, tmp_path / name) == want, name
    assert load_sequences(ckpt, tmp_path / "ids.json", max_sequences=2) == want[:2]
    grid = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    np.save(tmp_path / "grid.npy", grid)
    np.save(tmp_path / "one.npy", np.array([7, 8, 9, 10]))
    assert load_sequences(ckpt, tmp_path / "grid.npy") == [(1, 2, 3), (4, 5, 6)]
    assert load_sequences(ckpt, tmp_path / "one.npy") == [(7, 8, 9, 10)]


def test_sequences_bad_input_names_the_file(ckpt, bare_ckpt, tmp_path):
    from ckptaudit.errors import InputNotFoundError
    from ckptaudit.tasks.data import load_sequences

    with pytest.raises(InputNotFoundError, match="nope.json"):
        load_sequences(ckpt, tmp_path / "nope.json")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_sequences(ckpt, tmp_path / "bin.dat")
    (tmp_path / "short.json").write_text("[[1], [2]]")
    with pytest.raises(DataError, match="at least 2 tokens"):
        load_sequences(ckpt, tmp_path / "short.json")
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"ids": [3, 4]}\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        load_sequences(ckpt, tmp_path / "bad.jsonl")
    (tmp_path / "a.txt").write_text("w1 w2\n")
    with pytest.raises(DataError, match="tokenizer"):
        load_sequences(bare_ckpt, tmp_path / "a.txt")


def test_top1_count_equals_a_full_argmax_with_ties_and_nan():
    """The accuracy count takes the argmax only where it can hit the target; planted ties (the first maximal index
    wins, as torch.argmax), rows whose target is the maximum, and NaN rows give the count of a full argmax."""
    from ckptaudit.tasks.lm import top1_correct

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g)
    targets = torch.randint(0, 50, (200,), generator=g)
    logits[:60, :] = logits[:60, :].round()  # many exact ties
    logits[60:100].scatter_(1, targets[60:100, None], 10.0)  # target is the unique maximum
    logits[100:110, 7] = 10.0
    logits[100:110, 3] = 10.0  # a tie at 3 and 7: argmax is 3
    targets[100:105] = 7
    targets[105:110] = 3
    logits[110:115, 0] = float("nan")
    targets[110:115] = 0
    logits[115:118, 5] = float("nan")
    for n in (0, 1, 17, 200):
        ref = int((logits[:n].argmax(-1) == targets[:n]).sum())
        assert int(top1_correct(logits[:n], targets[:n])) == ref
    assert int(top1_correct(logits, targets)) >= 40 + 5 + 5


def test_a_batch_too_large_for_memory_is_differentiated_in_micro_batches(ckpt, tmp_path, monkeypatch):
    """With the activation budget cut to one window per micro-batch, the parts of a padded batch (windows of unequal
    length) sum to the whole batch's mean loss and their gradients to its gradient, both taken here by autograd
    through the model's own forward over the whole batch; a fisher gradient takes the same values as with the whole
    batch."""
    import ckptaudit.tasks.lm as lm
    from ckptaudit.analyses.fisher.directions import trunk_layout
    from ckptaudit.analyses.fisher.run import flat_gradient
    from ckptaudit.io.models import load_model
    from ckptaudit.io.roles import resolve_architecture
    from ckptaudit.tasks.data import loss_parts

    f = tmp_path / "ids.jsonl"
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13], [3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9]] * 2
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_data(ckpt, data=f, seq_len=8)
    model = load_model(ckpt).double()
    batch = d.collate(list(range(6)))
    params = [p for p in model.parameters() if p.requires_grad]
    # the reference: the model's own logits over the whole batch, mean CE over the real (non-padding) predictions
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    ref_grads = torch.autograd.grad(ref, params)

    assert lm.grad_batch_rows(model, 8) > 6  # the real budget takes this batch whole: one part
    assert len(list(loss_parts(d, model, batch))) == 1
    monkeypatch.setattr(lm, "GRAD_ACTIVATION_BYTES", 1)  # now every micro-batch is one window
    assert lm.grad_batch_rows(model, 8) == 1
    parts = list(loss_parts(d, model, batch))
    assert len(parts) == 6
    # the tool takes cross-entropy in float32 (a training loss stays in float32): float32 agreement with the reference
    assert float(sum(p.detach() for p in parts)) == pytest.approx(float(ref.detach()), rel=1e-6)
    grads = [torch.zeros_like(p) for p in params]
    for part in loss_parts(d, model, batch):
        for acc, g in zip(grads, torch.autograd.grad(part, params), strict=True):
            acc += g
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    layout = trunk_layout(resolve_architecture({n: tuple(t.shape) for n, t in model.state_dict().items()},
                                               ckpt.config()))
    g, loss, _ = flat_gradient(model, d, batch, layout)
    monkeypatch.setattr(lm, "GRAD_ACTIVATION_BYTES", 2 * 1024**3)
    g_whole, loss_whole, _ = flat_gradient(model, d, batch, layout)
    torch.testing.assert_close(g, g_whole, rtol=1e-5, atol=1e-7)
    assert float(loss) == pytest.approx(float(loss_whole), rel=1e-6)
