"""One tree per result, from which both the ``--json`` document and the HDF5 report derive.

A result implements :meth:`TreeResult.to_tree`: nested dicts and lists whose leaves are numbers, strings, bools,
None, numpy arrays or other :class:`TreeResult` objects. ``to_json()`` is the JSON form of that tree (numpy values
become plain numbers and lists, NaN and infinities None); ``to_hdf5_tree()`` is the same tree for
:func:`ckptaudit.report.hdf5.write_tree`. Where the two forms differ on purpose, the class says so once, by key of
its own tree:

- ``JSON_ONLY``: keys left out of the HDF5 report (e.g. a summary the report holds in another layout);
- ``HDF5_ONLY``: keys left out of the ``--json`` document (e.g. big arrays, timings);
- ``HDF5_SKIP_NONE``: keys the HDF5 report leaves out when their value is None (optional datasets);
- ``HDF5_AS_TEXT``: key -> name of the HDF5 attribute holding that value as JSON text (free-form dicts such as
  settings, which HDF5 attributes cannot hold);
- ``HDF5_LAYOUT``: key -> name of a method ``(value) -> dict`` giving the HDF5 entries that replace the key (the same
  content in the report's own layout: columns instead of rows, one group per step).
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and dataclass-like dicts into plain JSON types.

    NaN and infinities become None so the output is strict JSON.
    """
    if isinstance(obj, TreeResult):
        return obj.to_json()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # torch tensors
        return to_jsonable(obj.tolist())
    return obj


def hdf5_form(obj: Any) -> Any:
    """``obj`` with every nested :class:`TreeResult` replaced by its ``to_hdf5_tree()``."""
    if isinstance(obj, TreeResult):
        return obj.to_hdf5_tree()
    if isinstance(obj, dict):
        return {k: hdf5_form(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (TreeResult, dict)) for v in obj):
        return [hdf5_form(v) for v in obj]
    return obj


class TreeResult:
    """Base of every result: one :meth:`to_tree`, the declared differences, and the two forms derived from it."""

    JSON_ONLY: ClassVar[frozenset[str]] = frozenset()
    HDF5_ONLY: ClassVar[frozenset[str]] = frozenset()
    HDF5_SKIP_NONE: ClassVar[frozenset[str]] = frozenset()
    HDF5_AS_TEXT: ClassVar[dict[str, str]] = {}
    HDF5_LAYOUT: ClassVar[dict[str, str]] = {}

    def to_tree(self) -> dict[str, Any]:
        """The result as one nested tree (see the module docstring)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form of :meth:`to_tree`, without the ``HDF5_ONLY`` keys."""
        return {k: to_jsonable(v) for k, v in self.to_tree().items() if k not in self.HDF5_ONLY}

    def to_hdf5_tree(self) -> dict[str, Any]:
        """The HDF5 form of :meth:`to_tree`, without the ``JSON_ONLY`` keys, with ``HDF5_AS_TEXT`` keys as JSON
        text and ``HDF5_LAYOUT`` keys in their report layout."""
        out: dict[str, Any] = {}
        for k, v in self.to_tree().items():
            if k in self.JSON_ONLY or (v is None and k in self.HDF5_SKIP_NONE):
                continue
            if k in self.HDF5_LAYOUT:
                out.update(getattr(self, self.HDF5_LAYOUT[k])(v))
            elif k in self.HDF5_AS_TEXT:
                out[self.HDF5_AS_TEXT[k]] = json.dumps(to_jsonable(v), sort_keys=True, default=str)
            else:
                out[k] = hdf5_form(v)
        return out
