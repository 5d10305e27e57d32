"""Read the documents of a ``--data`` file: what every model-running command accepts, detected by content.

:func:`read_documents` returns a :class:`RawDocuments`: either texts (tokenised later with the checkpoint's own
tokenizer) or token-id documents, and the kind of file they came from:

===============  ==============================================================================================
kind             what the file is (how it is recognised)
===============  ==============================================================================================
``npy``          a ``.npy`` array of integer token ids (NumPy magic bytes): 1-D = one document, 2-D = one
                 document per row
``json-ids``     a JSON list of token-id lists (text starting with ``[``): one document per list
``jsonl-ids``    JSON Lines, one token-id list or ``{"input_ids": [...]}`` object per line
``jsonl-text``   JSON Lines, one ``{"text": "..."}`` object per line: one document per line
``text``         any other UTF-8 text: the whole file is one document
``datasets``     a folder written by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package): one
                 document per row, from its ``input_ids`` column, else its ``text`` column
``parquet``      a Parquet file (magic ``PAR1``; read with pyarrow, which ``datasets`` installs): as a dataset
===============  ==============================================================================================

Empty texts and empty id lists are skipped. Nothing is downloaded and no pickle is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptaudit.errors import CkptAuditError, DataError, InputNotFoundError
from ckptaudit.io.jsonio import loads_bounded

__all__ = ["DATA_KINDS", "RawDocuments", "read_documents", "read_token_ids"]

_NPY_MAGIC = b"\x93NUMPY"
_PARQUET_MAGIC = b"PAR1"
DATA_KINDS = ("npy", "json-ids", "jsonl-ids", "jsonl-text", "text", "datasets", "parquet")
_FORMATS_HINT = ("pass text, JSONL ('text' or 'input_ids' per line), token ids (.npy, JSON), or a datasets "
                 "folder / parquet file")


@dataclass(frozen=True, eq=False)
class RawDocuments:
    """The documents of one file: ``texts`` (strings to tokenise) or ``ids`` (int64 arrays), never both."""

    source: str
    kind: str
    texts: tuple[str, ...] | None = None
    ids: tuple[np.ndarray, ...] | None = None

    @property
    def tokenized(self) -> bool:
        """True when the file holds token ids (no tokenizer needed)."""
        return self.ids is not None

    def __len__(self) -> int:
        return len(self.ids if self.ids is not None else self.texts or ())


def read_token_ids(file: Path) -> np.ndarray:
    """Token ids of a ``.npy`` file as int64 ``[n]`` or ``[N, L]`` (no pickle: ``allow_pickle=False``)."""
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


def _id_array(values: Any, where: str) -> np.ndarray:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataError(f"{where}: expected a list of integer token ids",
                        hint='one [1, 2, 3] or {"input_ids": [1, 2, 3]} per line')
    return np.asarray(values, dtype=np.int64)


def _jsonl(file: Path, lines: list[str]) -> RawDocuments:
    texts: list[str] = []
    ids: list[np.ndarray] = []
    for n, line in enumerate(lines, 1):
        obj = loads_bounded(line, f"{file}: line {n}", error=DataError,
                            hint="each line of a JSONL file must be one JSON object or list")
        if isinstance(obj, dict) and "input_ids" in obj:
            ids.append(_id_array(obj["input_ids"], f"{file}: line {n}"))
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif isinstance(obj, list):
            ids.append(_id_array(obj, f"{file}: line {n}"))
        else:
            raise DataError(f"{file}: line {n} has neither a string 'text' nor an 'input_ids' list",
                            hint='each line must be {"text": "..."}, {"input_ids": [...]} or [ids]')
        if texts and ids:
            raise DataError(f"{file}: line {n} mixes text and token-id lines in one file",
                            hint="give either text or token ids")
    if ids:
        return RawDocuments(str(file), "jsonl-ids", ids=tuple(a for a in ids if a.size))
    return RawDocuments(str(file), "jsonl-text", texts=tuple(t for t in texts if t.strip()))


def _json_or_none(text: str, file: Path) -> Any:
    """The parsed document (bounded: io.jsonio), or None when ``text`` is not one JSON document."""
    try:
        return loads_bounded(text, str(file), error=DataError)
    except CkptAuditError:
        return None


def _text_file(file: Path) -> RawDocuments:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{file}: not UTF-8 text, JSONL, token ids, or a parquet file", hint=_FORMATS_HINT) from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{file}: the file is empty", hint="give a file with text or token ids")
    if stripped.startswith("["):
        whole = _json_or_none(text, file)
        if isinstance(whole, list) and whole and all(isinstance(x, list) for x in whole):
            return RawDocuments(str(file), "json-ids",
                                ids=tuple(a for i, x in enumerate(whole) if (a := _id_array(x, f"{file}: list {i}")).size))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if stripped.startswith(("{", "[")):
        if _json_or_none(lines[0], file) is None:
            return RawDocuments(str(file), "text", texts=(text,))
        return _jsonl(file, lines)
    return RawDocuments(str(file), "text", texts=(text,))


def _need_datasets(file: Path, what: str) -> Any:
    try:
        import datasets  # noqa: F401  (optional dependency)
        import pyarrow
    except ImportError:
        raise DataError(f"{file}: {what} needs the `datasets` package", hint="pip install datasets") from None
    return pyarrow


def _columns(file: Path, names: list[str], column: Any) -> RawDocuments:
    """Documents from a table with an ``input_ids`` or ``text`` column (``column(name)`` -> python list)."""
    if "input_ids" in names:
        rows = column("input_ids")
        return RawDocuments(str(file), "ids", ids=tuple(a for i, r in enumerate(rows)
                                                       if (a := _id_array(list(r), f"{file}: row {i}")).size))
    if "text" in names:
        return RawDocuments(str(file), "text", texts=tuple(t for t in column("text") if isinstance(t, str) and t.strip()))
    raise DataError(f"{file}: no 'input_ids' or 'text' column (columns: {', '.join(names) or 'none'})",
                    hint="give a dataset with an input_ids or a text column")


def _datasets_folder(file: Path) -> RawDocuments:
    _need_datasets(file, "a dataset folder")
    import datasets

    try:
        ds = datasets.load_from_disk(str(file))
    except Exception as exc:  # noqa: BLE001 - a foreign folder may be broken in any way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{file}: not a dataset folder written by save_to_disk ({first})",
                        hint="pass a folder from Dataset.save_to_disk, or a file") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise DataError(f"{file}: holds several splits ({splits}); give one of them",
                        hint=f"pass {file}/<split>, e.g. {file}/{next(iter(ds), 'train')}")
    docs = _columns(file, list(ds.column_names), lambda name: ds[name])
    return RawDocuments(docs.source, "datasets", texts=docs.texts, ids=docs.ids)


def _parquet(file: Path) -> RawDocuments:
    _need_datasets(file, "a parquet file")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(file), columns=None)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{file}: not a readable parquet file ({first})", hint="re-write it") from None
    docs = _columns(file, list(table.column_names), lambda name: table.column(name).to_pylist())
    return RawDocuments(docs.source, "parquet", texts=docs.texts, ids=docs.ids)


def read_documents(file: Path | str) -> RawDocuments:
    """The documents of ``file`` (see the module docstring for the kinds); DataError names the file and the fix."""
    file = Path(file)
    if file.is_dir():
        if not (file / "dataset_info.json").is_file() and not (file / "dataset_dict.json").is_file():
            raise DataError(f"--data {file}: a folder, but not one written by datasets' save_to_disk",
                            hint=_FORMATS_HINT)
        docs = _datasets_folder(file)
    elif not file.is_file():
        raise InputNotFoundError(f"--data {file}: no such file", hint=_FORMATS_HINT)
    else:
        with open(file, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
        if head == _NPY_MAGIC:
            arr = read_token_ids(file)
            rows = [arr] if arr.ndim == 1 else list(arr)
            docs = RawDocuments(str(file), "npy", ids=tuple(np.ascontiguousarray(r) for r in rows))
        elif head[:4] == _PARQUET_MAGIC:
            docs = _parquet(file)
        else:
            docs = _text_file(file)
    if len(docs) == 0:
        raise DataError(f"{file}: every document is empty", hint="give a file with text or token ids")
    return docs
