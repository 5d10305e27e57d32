"""io/data.py: text / JSONL / .npy data tokenised with a checkpoint's own tokenizer, built-in tasks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm_dir

from ckptaudit.errors import DataError
from ckptaudit.io.data import TokenData, check_enough, load_data

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


def test_plain_text_is_tokenised_and_chunked(ckpt, tmp_path):
    words = [WORDS[(3 * i) % 20] for i in range(100)]
    f = tmp_path / "a.txt"
    f.write_text(" ".join(words[:50]) + "\n" + " ".join(words[50:]) + "\n")
    d = load_data(ckpt, data=f, seq_len=8)
    assert isinstance(d, TokenData) and d.seq_len == 8 and d.n_tokens == 100
    expected = torch.tensor(_ids(words[:96])).view(12, 8)
    assert torch.equal(d.sequences, expected)
    assert d.split_size("train") == 11 and d.split_size("validation") == 1  # the last 10% (at least one)
    assert load_data(ckpt, data=f).seq_len == 16  # default: min(model positions, 128)


def test_jsonl_documents_are_joined_with_eos(ckpt, tmp_path):
    f = tmp_path / "a.jsonl"
    docs = [" ".join(WORDS[i : i + 5]) for i in range(0, 15, 5)]
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n")
    d = load_data(ckpt, data=f, seq_len=3)
    stream = []
    for t in docs:
        stream += _ids(t.split()) + [VOCAB["[EOS]"]]
    assert d.n_tokens == 18
    assert torch.equal(d.sequences.reshape(-1), torch.tensor(stream))


def test_npy_token_ids_1d_and_2d(ckpt, tmp_path):
    f1 = tmp_path / "ids.npy"
    np.save(f1, np.arange(40, dtype=np.int32) % 20)
    d = load_data(ckpt, data=f1, seq_len=10)
    assert d.sequences.dtype == torch.int64 and d.sequences.shape == (4, 10)
    assert torch.equal(d.sequences.reshape(-1), torch.arange(40) % 20)
    f2 = tmp_path / "rows.npy"
    rows = np.arange(3 * 9).reshape(3, 9) % 20
    np.save(f2, rows)
    d2 = load_data(ckpt, data=f2, seq_len=4)  # each row split alone: 2 sequences per row, tail dropped
    assert torch.equal(d2.sequences, torch.from_numpy(rows[:, :8].reshape(6, 4)))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 2, 99] * 10))
    with pytest.raises(DataError, match="vocabulary"):
        load_data(ckpt, data=bad, seq_len=4)


def test_batches_are_deterministic_and_loss_is_next_token_ce(ckpt, tmp_path):
    from ckptaudit.io.models import load_model

    f = tmp_path / "ids.npy"
    np.save(f, np.random.default_rng(0).integers(0, 20, 16 * 40))  # 40 distinct sequences
    d = load_data(ckpt, data=f, seq_len=16)
    a, b = d.batch("train", 1, 4, seed=5), d.batch("train", 1, 4, seed=5)
    assert torch.equal(a["input_ids"], b["input_ids"])
    epoch = torch.cat([d.batch("train", i, 4, seed=5)["input_ids"] for i in range(9)])  # 36 train sequences
    assert len({tuple(r.tolist()) for r in epoch}) == 36
    model = load_model(ckpt)
    loss, acc = d.loss_and_accuracy(model, a)
    with torch.no_grad():
        logits = model(input_ids=a["input_ids"]).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ref = -logp.gather(-1, a["input_ids"][:, 1:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert 0.0 <= acc <= 1.0
    vloss, vacc = d.evaluate(model, "validation")
    assert np.isfinite(vloss) and 0.0 <= vacc <= 1.0


def test_empty_file_and_too_few_tokens(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        load_data(ckpt, data=empty)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(DataError, match="short.txt.*32 tokens"):
        load_data(ckpt, data=short, seq_len=16)
    f = tmp_path / "some.npy"
    np.save(f, np.arange(16 * 20) % 20)
    d = load_data(ckpt, data=f, seq_len=16)
    with pytest.raises(DataError, match=r"some.npy.*need 64 train sequences") as err:
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
    assert load_data(ckpt, task="modadd:p=7").p == 7
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
    from ckptaudit.io.data import load_sequences

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
    from ckptaudit.io.data import load_sequences

    with pytest.raises(InputNotFoundError, match="nope.json"):
        load_sequences(ckpt, tmp_path / "nope.json")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="binary content"):
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
