"""Where the parts of a fused tensor lie: the closed vocabulary of split layouts (``FUSED_LAYOUTS``).

Every layout splits the *output axis* ``a`` of a stored tensor (rows of an ``nn.Linear`` weight, columns of a
GPT-2 ``Conv1D`` weight, the only axis of a bias) into parts, without copying: each part is a reshape ``view``
of the stored tensor plus basic-index selections (see :class:`ckptaudit.io.roles.Piece`). For the attention
layouts the parts are Q, K, V and the result also says where the heads of each part lie:

- ``thirds``: [Q | K | V], equal thirds; heads are runs of ``head_dim`` inside each third.
- ``heads_interleaved``: the axis is [n_heads, 3, head_dim] (GPT-NeoX, Bloom); part i is entry i of the middle
  axis, one head per entry of the first.
- ``grouped``: the axis is [n_kv, n_heads/n_kv + 2, head_dim] (Falcon): in every key/value group the group's
  query heads, then its key head, then its value head. With n_kv = 1 it is multi-query attention, with
  n_kv = n_heads it is ``heads_interleaved``. n_kv follows from the size: (n_heads + 2 n_kv) head_dim.
- ``by_head_counts``: [n_heads*dh | n_kv*dh | n_kv*dh] (Phi-3 ``qkv_proj``, OLMo ``att_proj``); n_kv from the
  config, or from the size as for ``grouped``.
- ``halves``: two equal halves (gate | up of a fused gated MLP); no heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptaudit.errors import UnknownArchitectureError

Selection = tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """One part of a fused tensor: its position in the parts list, the view, selections, and head layout."""

    index: int
    view: tuple[int, ...] | None
    selections: tuple[Selection, ...]
    head_axis: int | None = None
    head_per_entry: bool = False
    head_group: int | None = None


_HEADS_HINT = "give the checkpoint's config.json (num_attention_heads, num_key_value_heads, head_dim)"


def _need_heads(name: str, layout: str, n_heads: int | None) -> int:
    if n_heads is None:
        raise UnknownArchitectureError(
            f"{name}: splitting the fused {layout} tensor into Q/K/V needs the number of attention heads",
            hint=_HEADS_HINT)
    return n_heads


def _head_dim(name: str, dims: dict, n_heads: int) -> int:
    dh = dims.get("head_dim") or (dims["hidden"] // n_heads if dims.get("hidden") else None)
    if not dh:
        raise UnknownArchitectureError(f"{name}: splitting it needs the head dimension", hint=_HEADS_HINT)
    return int(dh)


def _kv_from_size(name: str, size: int, n_heads: int, dh: int, dims: dict) -> int:
    """n_kv of a fused axis of ``size`` = (n_heads + 2 n_kv) * dh, checked against the config's value."""
    units, rest = divmod(size, dh)
    n_kv = (units - n_heads) // 2 if not rest and units > n_heads and (units - n_heads) % 2 == 0 else 0
    if n_kv < 1 or n_heads % n_kv:
        raise UnknownArchitectureError(
            f"{name}: {size} features do not hold Q/K/V of {n_heads} heads of dimension {dh}", hint=_HEADS_HINT)
    stated = dims.get("n_kv_heads")
    if stated is not None and stated != n_kv:
        raise UnknownArchitectureError(
            f"{name}: {size} features hold {n_kv} key/value heads, the config says {stated}", hint=_HEADS_HINT)
    return n_kv


def _grouped_is_mha(size: int, n_heads: int, dims: dict) -> bool:
    """A grouped axis with as many key/value heads as query heads is the per-head interleaved layout."""
    dh = dims.get("head_dim") or (dims["hidden"] // n_heads if dims.get("hidden") else None)
    return bool(dh) and size == 3 * n_heads * dh


def split(layout: str, name: str, shape: tuple[int, ...], a: int, base: tuple[Selection, ...],
          dims: dict) -> tuple[list[Part], dict]:
    """The parts of tensor ``name`` (stored ``shape``) under ``layout``, split along axis ``a``.

    ``base``: selections that every part keeps (the expert entry of a stacked-experts tensor; they must lie on
    axes before ``a``). ``dims``: n_heads, n_kv_heads, head_dim, hidden from the config (None when unknown).
    Returns the parts and the dimensions the layout itself determined (e.g. ``n_kv_heads`` from the size).
    """
    size = shape[a]
    found: dict = {}

    def runs(bounds: list[tuple[int, int]], heads: bool) -> list[Part]:
        return [Part(i, None, (*base, (a, lo, hi)), head_axis=a if heads else None)
                for i, (lo, hi) in enumerate(bounds)]

    if layout in ("thirds", "halves"):
        k = 3 if layout == "thirds" else 2
        if size % k:
            raise UnknownArchitectureError(f"{name}: fused axis of size {size} is not divisible by {k}",
                                           hint="check the layout in the architecture file or --role-map")
        step = size // k
        return runs([(i * step, (i + 1) * step) for i in range(k)], heads=layout == "thirds"), found
    n = _need_heads(name, layout, dims.get("n_heads"))
    if layout == "heads_interleaved" or (layout == "grouped" and dims.get("n_heads") and _grouped_is_mha(size, n, dims)):
        if size % (3 * n):
            raise UnknownArchitectureError(f"{name}: {size} rows do not hold Q/K/V of {n} heads",
                                           hint="check num_attention_heads in config.json")
        view = (*shape[:a], n, 3, size // (3 * n), *shape[a + 1:])
        return [Part(i, view, (*base, (a + 1, i)), head_axis=a, head_per_entry=True) for i in range(3)], found
    dh = _head_dim(name, dims, n)
    n_kv = _kv_from_size(name, size, n, dh, dims)
    found["n_kv_heads"] = n_kv
    if layout == "grouped":
        g = n // n_kv
        view = (*shape[:a], n_kv, g + 2, dh, *shape[a + 1:])
        return [Part(0, view, (*base, (a + 1, 0, g)), head_axis=a, head_group=g),
                Part(1, view, (*base, (a + 1, g)), head_axis=a, head_per_entry=True),
                Part(2, view, (*base, (a + 1, g + 1)), head_axis=a, head_per_entry=True)], found
    if layout == "by_head_counts":
        q, kv = n * dh, n_kv * dh
        return runs([(0, q), (q, q + kv), (q + kv, q + 2 * kv)], heads=True), found
    raise UnknownArchitectureError(f"{name}: unknown fused layout {layout!r}")
