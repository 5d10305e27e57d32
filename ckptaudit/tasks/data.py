"""Evaluation / training data for the commands that run a network (resume-probe, fisher, extrapolate, cross-seed,
gxs): one meaning of ``--data`` for all of them.

:func:`load_data` returns an object with the :class:`ckptaudit.tasks.Task` data protocol (``batch``,
``eval_batches``, ``loss_and_accuracy``, ``loss``, ``evaluate``, ``split_size``), from one of three sources:

- nothing given: the built-in task recorded in the checkpoint (``ckptaudit_task.json``);
- ``task="NAME[:key=value,...]"``: a built-in task; parameters recorded in the checkpoint are kept when it is the
  same task, and ``key=value`` pairs override them;
- ``data=FILE``: a :class:`TokenData`. The file's documents (:mod:`ckptaudit.io.data_files`: plain text, JSONL
  text or ids, ``.npy`` / JSON token ids, a ``datasets`` folder or parquet file) are tokenised with the
  checkpoint's own tokenizer (local files only; an EOS token ends every document when the tokenizer has one and
  the file holds several documents) and cut into *windows*.

Windows (``WindowSpec``): ``seq_len`` tokens each (default: the model's context, at most ``DEFAULT_SEQ_LEN`` =
512). Without ``pack`` every document is cut on its own, so no window crosses a document boundary; a document's
last piece (and a short document) becomes a shorter window when it has at least 2 tokens. With ``pack`` the
documents are joined into one stream and cut into windows of exactly ``seq_len`` (the incomplete tail is dropped,
as Hugging Face's ``group_texts`` does). Windows are numbered in file order; the last ``VALIDATION_FRAC`` of them
(at least one) is the validation split, the rest the train split.

Bounded selection: at most ``eval_tokens`` tokens of validation windows are evaluated (default
``DEFAULT_EVAL_TOKENS`` = 65,536) and at most ``train_tokens`` of train windows are trained on (default: all). When
a split holds more, windows are drawn in the order of a permutation seeded by ``stable_seed("ckptaudit-windows",
split, seed)`` and kept while the running token count stays within the cap (at least one window), then put back
in file order. The same file, options and seed give the same windows in every process and rerun;
:meth:`TokenData.selection` records which (window numbers, token counts, and a SHA-256 of the selected token ids).

Loss is next-token cross-entropy in nats per predicted token (:mod:`ckptaudit.tasks.lm`: logits only at the
predicted positions, in chunks); accuracy is next-token top-1 accuracy over the same positions. Batches shorter
than the longest window are right-padded, with label -100 on the padding.

:func:`load_sequences` reads the same kinds of file as whole sequences, one per entry, nothing cut or joined, for
``gxs --as-given``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.errors import DataError
from ckptaudit.io.data_files import RawDocuments, read_documents, read_token_ids
from ckptaudit.io.models import has_tokenizer, load_tokenizer, max_positions
from ckptaudit.sampling import epoch_sample, stable_seed

__all__ = ["DEFAULT_EVAL_TOKENS", "DEFAULT_SEQ_LEN", "VALIDATION_FRAC", "TokenData", "WindowSpec", "Windows",
           "check_enough", "load_data", "load_rows", "load_sequences", "loss_parts", "make_windows", "parse_task",
           "read_token_ids", "select_windows", "tokenize_documents"]

DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_TOKENS = 65_536
VALIDATION_FRAC = 0.1
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class WindowSpec:
    """How a data file becomes windows and which of them are used (see the module docstring).

    ``seq_len`` None: the model's context capped at DEFAULT_SEQ_LEN. ``eval_tokens`` / ``train_tokens`` None: no
    cap. ``seed``: the selection seed.
    """

    seq_len: int | None = None
    pack: bool = False
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS
    train_tokens: int | None = None
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Windows:
    """Windows over a flat token array: window w is ``tokens[start[w] : start[w] + length[w]]``, from document
    ``doc[w]`` (in pack mode: the document its first token belongs to)."""

    tokens: np.ndarray
    start: np.ndarray
    length: np.ndarray
    doc: np.ndarray

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def ids(self, w: int) -> np.ndarray:
        """Token ids of window ``w`` (int64)."""
        s = int(self.start[w])
        return self.tokens[s : s + int(self.length[w])]


def make_windows(docs: list[np.ndarray] | tuple[np.ndarray, ...], seq_len: int, pack: bool) -> Windows:
    """Cut token-id documents into windows of ``seq_len`` (see the module docstring for the two rules)."""
    lengths = np.asarray([d.size for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs).astype(np.int64, copy=False) if docs else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if pack:
        n = tokens.size // seq_len
        start = np.arange(n, dtype=np.int64) * seq_len
        length = np.full(n, seq_len, dtype=np.int64)
        if n == 0 and tokens.size >= 2:  # a stream shorter than one window: the whole of it
            start, length = np.zeros(1, dtype=np.int64), np.asarray([tokens.size], dtype=np.int64)
        doc = np.searchsorted(offsets, start, side="right") - 1
        return Windows(tokens, start, length, doc.astype(np.int64))
    starts, lens, owners = [], [], []
    for d, (off, n) in enumerate(zip(offsets[:-1], lengths, strict=True)):
        s = np.arange(0, n, seq_len, dtype=np.int64)
        ln = np.minimum(seq_len, n - s)
        keep = ln >= 2
        starts.append(off + s[keep])
        lens.append(ln[keep])
        owners.append(np.full(int(keep.sum()), d, dtype=np.int64))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))  # noqa: E731
    return Windows(tokens, cat(starts), cat(lens), cat(owners))


def select_windows(pool: np.ndarray, lengths: np.ndarray, cap: int | None, split: str, seed: int) -> np.ndarray:
    """The windows of ``pool`` (window numbers, ascending) used under a token ``cap`` (see the module docstring)."""
    pool = np.asarray(pool, dtype=np.int64)
    if cap is None or int(lengths[pool].sum()) <= cap:
        return pool
    gen = torch.Generator().manual_seed(stable_seed("ckptaudit-windows", split, seed))
    order = pool[torch.randperm(pool.size, generator=gen).numpy()]
    running = np.cumsum(lengths[order])
    n = max(1, int(np.searchsorted(running, cap, side="right")))
    return np.sort(order[:n])


@dataclass(frozen=True, eq=False)
class TokenData:
    """Windows of a data file with the Task data protocol.

    ``windows``: every window of the file; ``n_train``: windows ``[0, n_train)`` form the train split, the rest
    validation. ``train`` / ``validation``: the window numbers used (after the token caps). ``pad_id``: the token
    written into padding (its label is -100).
    """

    windows: Windows
    n_train: int
    train: np.ndarray
    validation: np.ndarray
    source: str
    vocab_size: int
    n_tokens: int
    spec: WindowSpec
    seq_len: int
    kind: str
    n_documents: int
    pad_id: int = 0
    name: str = field(default="file")

    def _rows(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train
        if split == "validation":
            return self.validation
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def split_size(self, split: str) -> int:
        """Number of windows used in ``split``."""
        return int(self._rows(split).size)

    def collate(self, window_numbers: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels", "attention_mask"}`` ``[B, L]`` int64 for the given windows (right-padded to the
        longest; labels -100 and mask 0 on the padding)."""
        rows = [self.windows.ids(int(w)) for w in window_numbers]
        width = max(r.size for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : r.size] = r
            labels[i, : r.size] = r
            mask[i, : r.size] = 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}

    def batch_windows(self, split: str, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Window numbers of batch ``step`` of ``split`` (the seeded epoch sampler of the built-in tasks)."""
        rows = self._rows(split)
        if rows.size == 0:
            raise DataError(f"{self.source}: the {split} split is empty", hint="give more text or a shorter $seq_len",
                            param="seq_len")
        return rows[epoch_sample(rows.size, step, batch_size, "file-epoch", split, seed).numpy()]

    def batch(self, split: str, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Batch ``step`` of ``split``, a pure function of the arguments: global position ``step * batch_size + j``
        takes element ``i % n`` of epoch ``i // n``'s seeded permutation, so batches of one epoch never repeat a
        window."""
        return self.collate(self.batch_windows(split, step, batch_size, seed))

    def eval_batches(self, split: str, batch_size: int = 64) -> Iterator[dict[str, torch.Tensor]]:
        """The used windows of ``split`` in file order, ``batch_size`` windows per batch."""
        rows = self._rows(split)
        for lo in range(0, rows.size, batch_size):
            yield self.collate(rows[lo : lo + batch_size])

    def loss_and_accuracy(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Mean next-token cross-entropy (tensor with grad, nats) and next-token accuracy (float in [0, 1])."""
        from ckptaudit.tasks.lm import next_token_stats

        total, correct, n = next_token_stats(model, batch)
        if n == 0:
            raise DataError(f"{self.source}: a batch has no next-token prediction", hint="use longer windows")
        return total / n, correct / n

    def loss_parts(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """:meth:`loss` in parts sized to memory (ckptaudit.tasks.lm): the whole batch's mean loss when its
        backward pass fits GRAD_ACTIVATION_BYTES, else one part per micro-batch of ``grad_batch_rows`` windows, a
        micro-batch's summed cross-entropy over the whole batch's predictions. The parts sum to the mean loss and
        their gradients to its gradient; take each part's gradient before asking for the next, so that one
        micro-batch's activations are alive at a time."""
        from ckptaudit.tasks.lm import grad_batch_rows, next_token_stats, predictions

        rows = grad_batch_rows(model, self.seq_len)
        size = int(batch["input_ids"].shape[0])
        if rows is None or rows >= size:
            yield self.loss(model, batch)
            return
        n = predictions(batch)
        if n == 0:
            raise DataError(f"{self.source}: a batch has no next-token prediction", hint="use longer windows")
        for lo in range(0, size, rows):
            part = {k: v[lo : lo + rows] for k, v in batch.items()}
            if predictions(part):  # a micro-batch of padding only adds nothing (and has no graph)
                yield next_token_stats(model, part, accuracy=False)[0] / n

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean next-token cross-entropy of :meth:`loss_and_accuracy` without the accuracy (no argmax over
        the vocabulary: what a training step and a gradient need)."""
        from ckptaudit.tasks.lm import next_token_stats

        total, _, n = next_token_stats(model, batch, accuracy=False)
        if n == 0:
            raise DataError(f"{self.source}: a batch has no next-token prediction", hint="use longer windows")
        return total / n

    def evaluate(self, model: torch.nn.Module, split: str = "validation") -> tuple[float, float]:
        """Loss (nats per predicted token, summed in float64) and accuracy over the used windows of ``split``, in
        batches sized to memory, under ``torch.inference_mode``; train/eval mode restored."""
        from ckptaudit.tasks.lm import eval_batch_rows, next_token_stats

        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        try:
            with torch.inference_mode():
                for batch in self.eval_batches(split, eval_batch_rows(model, self.seq_len, self.vocab_size)):
                    s, c, n = next_token_stats(model, batch)
                    total += float(s)
                    correct += c
                    count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise DataError(f"{self.source}: the {split} split is empty", hint="give more text or a shorter $seq_len",
                            param="seq_len")
        return total / count, correct / count

    def model_config(self, *args: Any, **kwargs: Any) -> Any:
        """File data does not define a model (the checkpoint's own config is used)."""
        raise DataError(f"{self.source}: file data does not define a model configuration",
                        hint="use the checkpoint's config.json")

    def _split_record(self, split: str, pool: int, cap: int | None, listed: int) -> dict[str, Any]:
        rows = self._rows(split)
        tokens = int(self.windows.length[rows].sum())
        h = hashlib.sha256()
        for w in rows:
            h.update(self.windows.ids(int(w)).astype("<i8").tobytes())
        record = {"windows_used": int(rows.size), "windows_in_split": pool, "tokens_used": tokens,
                  "token_cap": cap, "capped": bool(rows.size < pool), "sha256": h.hexdigest()}
        if rows.size <= listed:
            record["windows"] = [int(w) for w in rows]
        return record

    def selection(self) -> dict[str, Any]:
        """Which windows were used, so two runs can be compared: per split the window numbers (up to 4096 listed),
        counts, the cap and a SHA-256 of the selected token ids; plus how the file was cut."""
        return {
            "rule": "windows in file order; last 10% validation; caps drawn by a seeded permutation "
                    "(stable_seed('ckptaudit-windows', split, seed)), then file order",
            "seq_len": self.seq_len, "pack": self.spec.pack, "seed": self.spec.seed, "kind": self.kind,
            "documents": self.n_documents, "tokens": self.n_tokens, "windows": len(self.windows),
            "train": self._split_record("train", self.n_train, self.spec.train_tokens, 4096),
            "validation": self._split_record("validation", len(self.windows) - self.n_train, self.spec.eval_tokens, 4096),
        }  # fmt: skip

    def task_spec(self, batch_size: int | None = None, data_seed: int | None = None) -> dict:
        """A JSON-able description (for reports), with :meth:`selection`."""
        spec: dict[str, Any] = {"task": self.name, "data": self.source, "seq_len": self.seq_len,
                                "n_tokens": self.n_tokens, "n_train": self.split_size("train"),
                                "n_validation": self.split_size("validation"), "selection": self.selection()}
        if batch_size is not None:
            spec["batch_size"] = int(batch_size)
        if data_seed is not None:
            spec["data_seed"] = int(data_seed)
        return spec


# ----------------------------------------------------------------------------------------------- tokenising


def _tokenizer(ckpt: Any, file: Path | str) -> Any:
    where = ckpt.path if getattr(ckpt, "layout", None) == "gguf" else ckpt.directory
    hint = "save it beside the weights (tokenizer.save_pretrained(dir)), or pass token ids (.npy, JSONL input_ids)"
    # Without tokenizer files AutoTokenizer may still build an empty tokenizer from config.json's model_type.
    if getattr(ckpt, "layout", None) != "gguf" and not has_tokenizer(where):
        raise DataError(f"{file}: text data needs the checkpoint's tokenizer, and {where} has no tokenizer files",
                        hint=hint)
    try:
        return load_tokenizer(where)
    except DataError as exc:
        raise DataError(f"{file}: text data needs the checkpoint's tokenizer, and {exc.message}", hint=hint) from None


def _pieces(text: str, size: int = 1 << 20) -> list[str]:
    """``text`` in pieces of about ``size`` characters, each ending at a line end that a non-space character
    follows (so tokens that span a line break are almost never cut); joined they give ``text`` back."""
    out, lo = [], 0
    while lo < len(text):
        hi = lo + size
        if hi < len(text):
            cut = text.find("\n", hi)
            while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
                cut = text.find("\n", cut + 1)
            hi = len(text) if cut == -1 else cut + 1
        out.append(text[lo:hi])
        lo = hi
    return out


def tokenize_documents(raw: RawDocuments, tokenizer: Any) -> list[np.ndarray]:
    """Token ids of each text document (no special tokens added; EOS appended to every document when there are
    several and the tokenizer has one). Long texts are tokenised in pieces (:func:`_pieces`), batched."""
    assert raw.texts is not None
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if eos is not None and len(raw.texts) > 1 else []
    out = []
    for text in raw.texts:
        pieces = _pieces(text)
        enc = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        ids = [i for piece in enc for i in piece] + tail
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _docs_of(ckpt: Any, raw: RawDocuments, file: Path | str) -> tuple[list[np.ndarray], int]:
    """(token-id documents, pad id) of ``raw``: text through the checkpoint's tokenizer."""
    if raw.ids is not None:
        return list(raw.ids), 0
    tok = _tokenizer(ckpt, file)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tok, "eos_token_id", None)
    return tokenize_documents(raw, tok), int(pad or 0)


def _seq_len(requested: int | None, max_pos: int | None, file: Path | str) -> int:
    seq_len = requested if requested is not None else min(max_pos or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if seq_len < 2:
        raise DataError(f"{file}: $seq_len={seq_len}: must be at least 2 (one next-token prediction)", param="seq_len")
    if max_pos is not None and seq_len > max_pos:
        raise DataError(f"{file}: $seq_len={seq_len} exceeds the model's {max_pos} positions",
                        hint=f"use $seq_len={max_pos} or less", param="seq_len")
    return seq_len


def _file_data(ckpt: Any, file: Path, spec: WindowSpec) -> TokenData:
    config = ckpt.config() if hasattr(ckpt, "config") else None
    max_pos = max_positions(config)
    vocab = int((config or {}).get("vocab_size") or 0)
    seq_len = _seq_len(spec.seq_len, max_pos, file)
    raw = read_documents(file)
    docs, pad = _docs_of(ckpt, raw, file)
    n_tokens = int(sum(d.size for d in docs))
    if n_tokens == 0:
        raise DataError(f"{file}: the data holds no tokens", hint="give a file with text or token ids")
    windows = make_windows(docs, seq_len, spec.pack)
    if windows.tokens.size and (int(windows.tokens.min()) < 0 or (vocab and int(windows.tokens.max()) >= vocab)):
        raise DataError(f"{file}: token ids range {int(windows.tokens.min())}..{int(windows.tokens.max())}, outside "
                        f"the model's vocabulary of {vocab}", hint="the ids were made with another tokenizer")
    n = len(windows)
    if n < 2:
        raise DataError(f"{file}: {n_tokens} tokens make {n} window(s) of up to {seq_len} tokens; at least 2 are "
                        f"needed (one train, one validation)", hint="give more text or a shorter $seq_len", param="seq_len")
    for name, cap in (("eval_tokens", spec.eval_tokens), ("train_tokens", spec.train_tokens)):
        if cap is not None and cap < 1:
            raise DataError(f"${name}={cap}: must be at least 1", param=name)
    n_val = max(1, int(math.floor(VALIDATION_FRAC * n)))
    n_train = n - n_val
    train = select_windows(np.arange(n_train), windows.length, spec.train_tokens, "train", spec.seed)
    validation = select_windows(np.arange(n_train, n), windows.length, spec.eval_tokens, "validation", spec.seed)
    return TokenData(windows=windows, n_train=n_train, train=train, validation=validation, source=str(file),
                     vocab_size=vocab, n_tokens=n_tokens, spec=spec, seq_len=seq_len, kind=raw.kind,
                     n_documents=len(docs), pad_id=pad)


def load_rows(ckpt: Any, file: str | Path, spec: WindowSpec | None = None) -> TokenData:
    """A training set as a trainer indexes it (``--train-data``): token-id rows used as they are, one example per
    row, in file order; text cut into windows by ``spec`` (seq_len, pack). Every row is in the train split (no
    validation split, no cap)."""
    spec = spec or WindowSpec()
    file = Path(file)
    config = ckpt.config() if hasattr(ckpt, "config") else None
    max_pos = max_positions(config)
    vocab = int((config or {}).get("vocab_size") or 0)
    raw = read_documents(file)
    docs, pad = _docs_of(ckpt, raw, file)
    if raw.tokenized:
        docs = [d for d in docs if d.size >= 2]
        longest = max((d.size for d in docs), default=0)
        if max_pos is not None and longest > max_pos:
            raise DataError(f"{file}: a row of {longest} tokens, the model takes at most {max_pos}",
                            hint="give rows of at most the model's context")
        windows = make_windows(docs, max(longest, 2), pack=False)
        seq_len = max(longest, 2)
    else:
        seq_len = _seq_len(spec.seq_len, max_pos, file)
        windows = make_windows(docs, seq_len, spec.pack)
    if len(windows) == 0:
        raise DataError(f"{file}: no row with at least 2 tokens", hint="give longer rows")
    if vocab and (int(windows.tokens.min()) < 0 or int(windows.tokens.max()) >= vocab):
        raise DataError(f"{file}: token ids outside the model's vocabulary of {vocab}",
                        hint="the ids were made with another tokenizer")
    every = np.arange(len(windows), dtype=np.int64)
    used = WindowSpec(seq_len, spec.pack, None, None, spec.seed)
    return TokenData(windows=windows, n_train=len(windows), train=every, validation=np.zeros(0, dtype=np.int64),
                     source=str(file), vocab_size=vocab, n_tokens=int(windows.length.sum()), spec=used,
                     seq_len=seq_len, kind=raw.kind, n_documents=len(docs), pad_id=pad, name="rows")


def load_sequences(ckpt: Any, file: str | Path, max_sequences: int | None = None) -> list[tuple[int, ...]]:
    """Evaluation sequences of ``file``, one per entry, nothing cut or joined (``gxs --as-given``).

    Accepted: every kind of :func:`ckptaudit.io.data_files.read_documents` (a 1-D ``.npy`` is one sequence, 2-D
    one per row; JSON / JSONL id lists one per entry; JSONL text, datasets and parquet text columns one per
    entry), except that plain text gives one sequence per non-empty line. Text is tokenised with ``ckpt``'s own
    tokenizer (special tokens added as the tokenizer does by default). Sequences shorter than 2 tokens are
    dropped; at most ``max_sequences`` are kept. Errors (DataError / InputNotFoundError) name the file and the fix.
    """
    raw = read_documents(file)
    if raw.ids is not None:
        seqs = [tuple(int(i) for i in a) for a in raw.ids]
    else:
        texts = raw.texts or ()
        if raw.kind == "text":
            texts = tuple(line for line in texts[0].splitlines() if line.strip())
        tok = _tokenizer(ckpt, file)
        seqs = [tuple(tok(t)["input_ids"]) for t in texts]
    seqs = [x for x in seqs if len(x) >= 2][: max_sequences or None]
    if not seqs:
        raise DataError(f"$data={file}: no sequence with at least 2 tokens", "give longer sequences", param="data")
    return seqs


# ------------------------------------------------------------------------------------------------ entry point


def parse_task(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME[:key=value,...]"`` -> (name, params); values are JSON numbers/strings."""
    name, _, params = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, params.split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise json.JSONDecodeError("no '='", item, 0)
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"$task={spec}: {item!r} is not key=value", hint="e.g. $task=modadd:p=97", param="task") from None
    return name.strip(), kwargs


def load_data(ckpt: Any, task: str | None = None, data: str | Path | None = None, seq_len: int | None = None,
              windows: WindowSpec | None = None) -> Any:
    """Data for running ``ckpt``'s model: its recorded task, the built-in ``task``, or the file ``data``.

    ``ckpt``: a Checkpoint (``.path``, ``.config()``). ``task``: ``"NAME[:key=value,...]"``. ``data``: a file or
    dataset folder (see the module docstring). ``windows``: how the file is cut and capped (``seq_len`` overrides
    its seq_len). Returns a Task-protocol object. Errors (DataError): both given, unknown task, no recorded task,
    empty file, too few tokens, a tokenizer missing for text.
    """
    from ckptaudit.tasks import TASK_FILE, get_task, load_task_spec, task_from_spec

    where = ckpt.directory
    if task is not None and data is not None:
        raise DataError("give either $task or $data, not both", param="data")
    if data is not None:
        spec = windows or WindowSpec()
        if seq_len is not None:
            spec = WindowSpec(seq_len, spec.pack, spec.eval_tokens, spec.train_tokens, spec.seed)
        return _file_data(ckpt, Path(data), spec)
    spec = load_task_spec(where) if (where / TASK_FILE).is_file() else {}
    if task is None:
        if not spec:
            raise DataError(f"{where}: no {TASK_FILE}, so the data this checkpoint was trained on is unknown",
                            hint="pass $data=FILE (text, JSONL, token ids, a dataset) or $task=NAME", param="data")
        return task_from_spec(spec, source=where / TASK_FILE)
    name, params = parse_task(task)
    if spec.get("task") == name:  # same task: the checkpoint's parameters unless overridden
        merged = {k: v for k, v in spec.items() if k not in ("task", "batch_size", "data_seed", "train")}
        merged.update(params)
        params = merged
    built = get_task(name, **params)
    _check_task_fits(built, ckpt, task)
    return built


def _check_task_fits(built: Any, ckpt: Any, spec: str) -> None:
    """A built-in task whose vocabulary is not the model's is another task (e.g. modadd with another p): refused,
    rather than probed at chance accuracy with the opposite verdict."""
    try:
        config = ckpt.config() or {}
    except DataError:
        return
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab == built.vocab_size:
        return
    fix = built.params_for_vocab(vocab) if hasattr(built, "params_for_vocab") else None
    hint = (f"give the task as the model was trained: $task={built.name}:" + ",".join(f"{k}={v}" for k, v in fix.items())
            if fix else "give the task's parameters as the model was trained")
    raise DataError(f"$task={spec}: the task's vocabulary has {built.vocab_size} tokens, the model's ({ckpt.path}) "
                    f"{vocab}", hint=hint, param="task")


def check_enough(data: Any, n_batches: int, batch_size: int, split: str = "train") -> None:
    """File data must hold ``n_batches * batch_size`` distinct windows in ``split`` (independent batches).

    Built-in tasks are generated and cycle through epochs, so they are not checked. Raises DataError naming the
    file and how many tokens are needed.
    """
    if not isinstance(data, TokenData):
        return
    need = int(n_batches) * int(batch_size)
    have = data.split_size(split)
    if have < need:
        total = need + max(1, math.ceil(need * VALIDATION_FRAC / (1 - VALIDATION_FRAC)))
        capped = " ($train_tokens caps it)" if data.spec.train_tokens is not None and split == "train" else ""
        raise DataError(
            f"{data.source}: {n_batches} batches of {batch_size} windows need {need} {split} windows of "
            f"{data.seq_len} tokens (about {total * data.seq_len} tokens in the file); it has {data.n_tokens} "
            f"tokens -> {have} {split} windows{capped}",
            hint="give more text, or lower $batches / $batch_size / $seq_len",
        )


def loss_parts(data: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """``data.loss_parts(model, batch)`` where the data splits its loss into micro-batches sized to memory
    (TokenData), else the whole ``data.loss(model, batch)`` as one part: the parts' gradients sum to the loss's."""
    parts = getattr(data, "loss_parts", None)
    return parts(model, batch) if parts is not None else iter((data.loss(model, batch),))
