"""Evaluation / training data for the analyses that run a network (fisher, resume-probe, gxs, extrapolate).

:func:`load_data` returns an object with the :class:`ckptaudit.tasks.Task` data protocol (``batch``,
``eval_batches``, ``loss_and_accuracy``, ``evaluate``, ``split_size``), from one of three sources:

- nothing given: the built-in task recorded in the checkpoint (``ckptaudit_task.json``);
- ``task="NAME[:key=value,...]"``: a built-in task; parameters recorded in the checkpoint are kept when it is the
  same task, and ``key=value`` pairs override them;
- ``data=FILE``: a :class:`TokenData` built from plain text, JSONL with a ``"text"`` field, or token ids in a
  ``.npy`` array (1-D: one stream; 2-D ``[N, L]``: one row per document). Text is tokenised with the checkpoint's
  own tokenizer (``ckptaudit.io.models.load_tokenizer``, local files only), never downloaded.

File data is chunked into sequences of ``seq_len`` tokens (default ``min(model max positions, 128)``); the last
``VALIDATION_FRAC`` of the sequences (contiguous, so no validation sequence shares text with a neighbouring train
sequence) is the validation split. Loss is next-token cross-entropy in nats averaged over the ``seq_len - 1``
predictions of every sequence; accuracy is next-token top-1 accuracy over the same positions.

:func:`load_sequences` reads the same kinds of file (and token-id JSON/JSONL) as whole sequences, one per entry,
for the analyses that evaluate given sequences as they are (gxs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ckptaudit.errors import DataError, InputNotFoundError
from ckptaudit.io.jsonio import loads_bounded
from ckptaudit.io.models import has_tokenizer, load_tokenizer, max_positions
from ckptaudit.tasks.sampling import epoch_sample

__all__ = ["DEFAULT_SEQ_LEN", "VALIDATION_FRAC", "TokenData", "check_enough", "load_data", "load_sequences",
           "parse_task", "read_token_ids"]

DEFAULT_SEQ_LEN = 128
VALIDATION_FRAC = 0.1
SPLITS = ("train", "validation")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True, eq=False)
class TokenData:
    """Sequences of token ids from a file, with the Task data protocol.

    ``sequences``: int64 tensor ``[N, seq_len]``; rows ``[0, n_train)`` are the train split, the rest validation.
    ``source``: the file, for messages. ``vocab_size``: the model's vocabulary (ids are checked against it).
    """

    sequences: torch.Tensor
    n_train: int
    source: str
    vocab_size: int
    n_tokens: int
    name: str = field(default="file")

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (``seq_len - 1`` next-token predictions each)."""
        return int(self.sequences.shape[1])

    def _rows(self, split: str) -> torch.Tensor:
        if split == "train":
            return self.sequences[: self.n_train]
        if split == "validation":
            return self.sequences[self.n_train :]
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def split_size(self, split: str) -> int:
        """Number of sequences in ``split``."""
        return int(self._rows(split).shape[0])

    def batch(self, split: str, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Batch ``step`` of ``split``: ``{"input_ids": [B, seq_len] int64}``, a pure function of the arguments.

        Same scheme as the built-in tasks: global position ``step * batch_size + j`` takes element ``i % n`` of
        epoch ``i // n``'s seeded permutation, so batches of one epoch never repeat a sequence.
        """
        rows = self._rows(split)
        if rows.shape[0] == 0:
            raise DataError(f"{self.source}: the {split} split is empty", hint="give more text or a shorter --seq-len")
        return {"input_ids": rows[epoch_sample(rows.shape[0], step, batch_size, "file-epoch", split, seed)]}

    def eval_batches(self, split: str, batch_size: int = 64) -> Iterator[dict[str, torch.Tensor]]:
        """The whole of ``split`` in file order, in batches of at most ``batch_size`` sequences."""
        rows = self._rows(split)
        for start in range(0, rows.shape[0], batch_size):
            yield {"input_ids": rows[start : start + batch_size]}

    @staticmethod
    def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out

    def loss_and_accuracy(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """Mean next-token cross-entropy (tensor with grad, nats) and next-token accuracy (float in [0, 1])."""
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        logits = self._logits(model, ids)[:, :-1]
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        acc = (logits.argmax(dim=-1) == targets).float().mean().item()
        return loss, acc

    def evaluate(self, model: torch.nn.Module, split: str = "validation") -> tuple[float, float]:
        """Loss (nats per predicted token) and accuracy over the whole of ``split``; train/eval mode restored."""
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in self.eval_batches(split):
                ids = batch["input_ids"].to(device)
                logits = self._logits(model, ids)[:, :-1].double()
                targets = ids[:, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         reduction="sum").item()
                correct += int((logits.argmax(dim=-1) == targets).sum().item())
                count += targets.numel()
        model.train(was_training)
        if count == 0:
            raise DataError(f"{self.source}: the {split} split is empty", hint="give more text or a shorter --seq-len")
        return total / count, correct / count

    def model_config(self, *args: Any, **kwargs: Any) -> Any:
        """File data does not define a model (the checkpoint's own config is used)."""
        raise DataError(f"{self.source}: file data does not define a model configuration",
                        hint="use the checkpoint's config.json")

    def task_spec(self, batch_size: int | None = None, data_seed: int | None = None) -> dict:
        """A JSON-able description (for reports)."""
        spec: dict[str, Any] = {"task": self.name, "data": self.source, "seq_len": self.seq_len,
                                "n_tokens": self.n_tokens, "n_train": self.n_train,
                                "n_validation": self.split_size("validation")}
        if batch_size is not None:
            spec["batch_size"] = int(batch_size)
        if data_seed is not None:
            spec["data_seed"] = int(data_seed)
        return spec


# ----------------------------------------------------------------------------------------------- reading files


def _tokenizer(ckpt: Any, file: Path) -> Any:
    where = ckpt.directory
    hint = "save it beside the weights (tokenizer.save_pretrained(dir)), or pass token ids as a .npy file"
    # Without tokenizer files AutoTokenizer may still build an empty tokenizer from config.json's model_type.
    if not has_tokenizer(where):
        raise DataError(f"{file}: text data needs the checkpoint's tokenizer, and {where} has no tokenizer files",
                        hint=hint)
    try:
        return load_tokenizer(where)
    except DataError as exc:
        raise DataError(f"{file}: text data needs the checkpoint's tokenizer, and {exc.message}", hint=hint) from None


def _read_texts(file: Path) -> list[str]:
    """Documents of a plain-text file (one document) or of a JSONL file (one ``"text"`` per line)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{file}: not UTF-8 text, JSONL, or a .npy array of token ids",
                        hint="pass text, JSONL with a 'text' field, or np.save(ids)") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{file}: the file is empty", hint="give a file with text or token ids")
    first = _json_or_none(lines[0])
    if not (isinstance(first, dict) and "text" in first):
        return [text]
    docs = []
    for i, line in enumerate(lines, 1):
        obj = loads_bounded(line, f"{file}: line {i}", error=DataError,
                            hint="each line of a JSONL file must be one object with a 'text' field")
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{file}: line {i} has no string 'text' field",
                            hint="each line of a JSONL file must be one object with a 'text' field")
        if obj["text"].strip():
            docs.append(obj["text"])
    if not docs:
        raise DataError(f"{file}: every 'text' field is empty", hint="give a file with text")
    return docs


def read_token_ids(file: Path) -> np.ndarray:
    """Token ids of a ``.npy`` file (detected by its magic bytes) as int64 ``[n]`` or ``[N, L]``."""
    try:
        arr = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{file}: not a readable .npy array ({exc})", hint="write it with np.save(path, ids)") from None
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{file}: token ids must be a 1-D or 2-D integer array, got {arr.dtype} {arr.shape}",
                        hint="np.save(path, np.asarray(ids, dtype=np.int64))")
    if arr.size == 0:
        raise DataError(f"{file}: the file is empty (no token ids)", hint="give a file with token ids")
    return arr.astype(np.int64, copy=False)


def _sequences(docs: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """Concatenate 1-D documents and cut into ``[N, seq_len]`` (the incomplete tail is dropped)."""
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = stream.size // seq_len
    return torch.from_numpy(np.ascontiguousarray(stream[: n * seq_len].reshape(n, seq_len)))


def _file_data(ckpt: Any, file: Path, seq_len: int | None) -> TokenData:
    if not file.is_file():
        raise InputNotFoundError(f"--data {file}: no such file")
    config = ckpt.config() if hasattr(ckpt, "config") else None
    max_pos = max_positions(config)
    vocab = int((config or {}).get("vocab_size") or 0)
    if seq_len is None:
        seq_len = min(max_pos or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if seq_len < 2:
        raise DataError(f"{file}: seq_len must be at least 2 (one next-token prediction), got {seq_len}")
    if max_pos is not None and seq_len > max_pos:
        raise DataError(f"{file}: seq_len {seq_len} exceeds the model's {max_pos} positions",
                        hint=f"use --seq-len {max_pos} or less")
    with open(file, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        arr = read_token_ids(file)
        if arr.ndim == 2:
            if arr.shape[1] < seq_len:  # rows shorter than the requested length: each row is one sequence
                seq_len = int(arr.shape[1])
                if seq_len < 2:
                    raise DataError(f"{file}: rows of {seq_len} token(s) give no next-token prediction")
            # Rows are documents: chunk each on its own so no sequence straddles two rows.
            usable = (arr.shape[1] // seq_len) * seq_len
            seqs = torch.from_numpy(np.ascontiguousarray(arr[:, :usable].reshape(-1, seq_len)))
        else:
            seqs = _sequences([arr], seq_len)
        n_tokens = int(arr.size)
    else:
        docs = _read_texts(file)
        tok = _tokenizer(ckpt, file)
        eos = getattr(tok, "eos_token_id", None)
        ids = []
        for doc in docs:
            enc = tok(doc, add_special_tokens=False)["input_ids"]
            # Documents are joined with EOS when the tokenizer has one, as in ordinary LM training.
            ids.append(np.asarray(enc + ([eos] if eos is not None and len(docs) > 1 else []), dtype=np.int64))
        n_tokens = int(sum(a.size for a in ids))
        if n_tokens == 0:
            raise DataError(f"{file}: the text tokenises to no tokens", hint="give a file with text")
        seqs = _sequences(ids, seq_len)
    if seqs.numel() and (int(seqs.min()) < 0 or (vocab and int(seqs.max()) >= vocab)):
        raise DataError(f"{file}: token ids range {int(seqs.min())}..{int(seqs.max())}, outside the model's "
                        f"vocabulary of {vocab}", hint="the ids were made with another tokenizer")
    n = int(seqs.shape[0])
    if n < 2:
        raise DataError(f"{file}: {n_tokens} tokens make {n} sequence(s) of {seq_len}; at least 2 are needed "
                        f"(one train, one validation), i.e. {2 * seq_len} tokens",
                        hint="give more text or a shorter --seq-len")
    n_val = max(1, int(math.floor(VALIDATION_FRAC * n)))
    return TokenData(sequences=seqs, n_train=n - n_val, source=str(file), vocab_size=vocab, n_tokens=n_tokens)


def load_sequences(ckpt: Any, file: str | Path, max_sequences: int | None = None) -> list[tuple[int, ...]]:
    """Evaluation sequences of ``file``, one per entry (what ``gxs`` evaluates; nothing is cut or joined).

    Accepted: a ``.npy`` array of token ids (2-D: one row per sequence; 1-D: one sequence); a JSON list of id
    lists; JSONL with one id list or ``{"input_ids": [...]}`` per line; JSONL with ``{"text": ...}`` per line (one
    sequence per document); plain text (one sequence per non-empty line). Text is tokenised with ``ckpt``'s own
    tokenizer (special tokens added as the tokenizer does by default). Sequences shorter than 2 tokens are
    dropped; at most ``max_sequences`` are kept. Errors (DataError / InputNotFoundError) name the file and the fix.
    """
    file = Path(file)
    if not file.is_file():
        raise InputNotFoundError(f"--data {file}: no such file",
                                 "pass token ids (.npy, JSON, JSONL) or text (lines, or JSONL with 'text')")
    with open(file, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        arr = read_token_ids(file)
        seqs = [tuple(r) for r in (arr.reshape(1, -1) if arr.ndim == 1 else arr).tolist()]
    else:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"--data {file}: not a text file or a .npy array (binary content)",
                            "pass token ids as .npy (np.save), JSON ([[1, 2, 3], ...]), JSONL, or text lines") from None
        stripped = text.lstrip()
        whole = _json_or_none(text) if stripped.startswith("[") else None
        first = _json_or_none(stripped.splitlines()[0]) if stripped.startswith("{") else None
        try:
            if isinstance(whole, list) and whole and all(isinstance(x, list) for x in whole):
                seqs = [tuple(map(int, x)) for x in whole]
            elif isinstance(first, dict) and "text" in first:
                tok = _tokenizer(ckpt, file)
                seqs = [tuple(tok(doc)["input_ids"]) for doc in _read_texts(file)]
            elif stripped.startswith(("[", "{")):
                seqs = []
                for line in filter(None, (ln.strip() for ln in text.splitlines())):
                    obj = loads_bounded(line, f"--data {file}", error=DataError,
                                        hint='expected one [..] or {"input_ids": [..]} per line')
                    seqs.append(tuple(map(int, obj["input_ids"] if isinstance(obj, dict) else obj)))
            else:
                tok = _tokenizer(ckpt, file)
                seqs = [tuple(tok(line)["input_ids"]) for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--data {file}: not a list of token-id sequences ({e})",
                            'expected [[1, 2, 3], ...], one [..] / {"input_ids": [..]} per line, or text') from None
    seqs = [x for x in seqs if len(x) >= 2][: max_sequences or None]
    if not seqs:
        raise DataError(f"--data {file}: no sequence with at least 2 tokens", "give longer sequences")
    return seqs


def _json_or_none(text: str) -> Any:
    """The parsed document, or None when ``text`` is not one JSON document (e.g. JSONL)."""
    from ckptaudit.errors import CkptAuditError

    try:
        return loads_bounded(text, "json")
    except CkptAuditError:
        return None


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
            raise DataError(f"--task {spec}: {item!r} is not key=value", hint="e.g. --task modadd:p=97") from None
    return name.strip(), kwargs


def load_data(ckpt: Any, task: str | None = None, data: str | Path | None = None, seq_len: int | None = None) -> Any:
    """Data for running ``ckpt``'s model: its recorded task, the built-in ``task``, or the file ``data``.

    ``ckpt``: a Checkpoint (``.path``, ``.config()``). ``task``: ``"NAME[:key=value,...]"``. ``data``: a text,
    JSONL or ``.npy`` file (see the module docstring). ``seq_len``: tokens per sequence for file data. Returns a
    Task-protocol object. Errors (DataError): both given, unknown task, no recorded task, empty file, too few
    tokens, a tokenizer missing for text.
    """
    from ckptaudit.tasks import TASK_FILE, get_task, load_task_spec, task_from_spec

    where = ckpt.directory
    if task is not None and data is not None:
        raise DataError("give either --task or --data, not both")
    if data is not None:
        return _file_data(ckpt, Path(data), seq_len)
    spec = load_task_spec(where) if (where / TASK_FILE).is_file() else {}
    if task is None:
        if not spec:
            raise DataError(f"{where}: no {TASK_FILE}, so the data this checkpoint was trained on is unknown",
                            hint="pass --data FILE (text, JSONL or .npy token ids) or --task NAME")
        return task_from_spec(spec, source=where / TASK_FILE)
    name, params = parse_task(task)
    if spec.get("task") == name:  # same task: the checkpoint's parameters unless overridden
        merged = {k: v for k, v in spec.items() if k not in ("task", "batch_size", "data_seed", "train")}
        merged.update(params)
        params = merged
    return get_task(name, **params)


def check_enough(data: Any, n_batches: int, batch_size: int, split: str = "train") -> None:
    """File data must hold ``n_batches * batch_size`` distinct sequences in ``split`` (independent batches).

    Built-in tasks are generated and cycle through epochs, so they are not checked. Raises DataError naming the
    file and how many tokens are needed.
    """
    if not isinstance(data, TokenData):
        return
    need = int(n_batches) * int(batch_size)
    have = data.split_size(split)
    if have < need:
        # The train split is (1 - VALIDATION_FRAC) of the sequences, so ask for the total that yields `need`.
        total_seq = need + max(1, math.ceil(need * VALIDATION_FRAC / (1 - VALIDATION_FRAC)))
        raise DataError(
            f"{data.source}: {n_batches} batches of {batch_size} sequences need {need} {split} sequences of "
            f"{data.seq_len} tokens (about {total_seq * data.seq_len} tokens in the file); it has {data.n_tokens} "
            f"tokens -> {have} {split} sequences",
            hint="give more text, or lower --batches / --batch-size / --seq-len",
        )
