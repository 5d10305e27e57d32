"""Training regimes from activation fingerprints (SPEC §7, paper 004 sections 2.2-2.3).

At every checkpoint the model runs a fixed probe set; the mean-pooled final hidden state of each probe
(``output_hidden_states``, last layer, mean over the probe's real positions) gives a representation
``R_t [n_probes, d]``; its flattening is the fingerprint ``a_t [n_probes * d]``. ``s_t = cos(a_t, a_{t-1})``
between consecutive checkpoints, and

    regime(t) = stable if s_t > tau_high, chaotic if s_t < tau_low, transition otherwise

(the first checkpoint has no predecessor: its regime is "unknown"). Default thresholds are adaptive, the 30th /
70th percentiles of s_t over the run (numpy's linear interpolation), the rule of the paper's public code; fixed
thresholds can be given instead.

Probe inputs (``build_probes``), in order of preference:
- a tokenizer saved with the checkpoint: the probe texts (``ckptaudit/data/probes.txt``, shipped in the package, 100 lines spanning
  arithmetic, linguistic, factual and random-token inputs, or ``--probes FILE``), tokenised and padded;
- no tokenizer but ``--probes FILE``: each line must be whitespace-separated integer token ids;
- no tokenizer, a built-in task (the fixture runs): the task cannot read text, so its own fixed inputs stand in:
  half the probes are seeded validation inputs of the task, half are seeded random-token sequences of the
  task's length (the "random tokens" category of the paper's probe set);
- neither: seeded random-token sequences only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptaudit.analyses.regimes.signals import RegimeSignals
from ckptaudit.errors import CorruptFileError, DataError, UsageError
from ckptaudit.io.bundled import DEFAULT_PROBES as DEFAULT_PROBES_NAME
from ckptaudit.io.bundled import bundled_file
from ckptaudit.io.models import fill_model, has_tokenizer, load_tokenizer, max_positions
from ckptaudit.io.types import StoredCheckpoint
from ckptaudit.report.tree import TreeResult
from ckptaudit.sampling import stable_seed

REGIMES = ("chaotic", "transition", "stable")
UNKNOWN = "unknown"
DEFAULT_PERCENTILES = (30.0, 70.0)
DEFAULT_PROBES = bundled_file(DEFAULT_PROBES_NAME)


# ----------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """Fixed probe inputs: ``input_ids`` / ``attention_mask`` ``[n_probes, L]`` int64 (mask 1 = real token).

    ``source`` says in words where they came from (reported verbatim).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def read_probe_lines(path: Path | str) -> list[str]:
    """Non-empty lines of a probe file (a line starting with '#' is a comment)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such probe file", hint="pass a text file with one probe per line")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{path}: no probes in the file", hint="one probe per line")
    return lines


def _pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_id_probes(path: Path, vocab_size: int, max_len: int) -> ProbeSet:
    rows = []
    for n, line in enumerate(read_probe_lines(path), 1):
        try:
            ids = [int(x) for x in line.split()]
        except ValueError:
            raise DataError(
                f"{path}:{n}: the checkpoint has no tokenizer, so probes must be integer token ids, got {line[:40]!r}",
                hint="save the tokenizer next to the weights, or write one line of token ids per probe",
            ) from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise DataError(f"{path}:{n}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        rows.append(ids[:max_len])
    ids, mask = _pad(rows)
    return ProbeSet(ids, mask, f"{path} ({len(rows)} token-id probes)")


def _random_tokens(n: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stable_seed("regimes-probes", seed))
    return torch.randint(0, vocab_size, (n, length), generator=gen)


def build_probes(
    ckpt_dir: Path | None,
    config: dict | None,
    probes_file: Path | None = None,
    task: Any = None,
    seed: int = 0,
    n_probes: int = 100,
) -> ProbeSet:
    """The probe set for the checkpoints of a run (see the module docstring for the order of preference).

    ``ckpt_dir`` is a checkpoint directory (where a tokenizer would be), ``config`` its config.json dict,
    ``task`` a built-in task or None. Deterministic given ``seed``.
    """
    config = config or {}
    try:
        vocab = int(config.get("vocab_size") or (task.vocab_size if task is not None else 0))
    except (TypeError, ValueError):
        raise CorruptFileError(f"config.json: 'vocab_size' must be an integer, got {config.get('vocab_size')!r}",
                               hint="fix or regenerate the checkpoint's config.json") from None
    max_len = max_positions(config) or 128
    if ckpt_dir is not None and has_tokenizer(ckpt_dir):
        texts = read_probe_lines(probes_file or DEFAULT_PROBES)
        tok = load_tokenizer(ckpt_dir)  # DataError (one line) when the files there are broken
        if tok.pad_token is None:  # GPT-2 style tokenizers have none; padded positions are masked anyway
            tok.pad_token = tok.eos_token or tok.unk_token
        try:
            enc = tok(texts, padding=True, truncation=True, max_length=min(max_len, 128), return_tensors="pt")
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(
                f"{ckpt_dir}: its tokenizer cannot encode the probes ({type(exc).__name__}: "
                f"{(str(exc).strip().splitlines() or [''])[0][:200]})",
                hint="save a tokenizer with a pad, eos or unk token (tokenizer.save_pretrained(dir))",
            ) from None
        return ProbeSet(enc["input_ids"].long(), enc["attention_mask"].long(), f"{probes_file or DEFAULT_PROBES} ({len(texts)} texts)")
    if vocab < 1:
        raise DataError("cannot build probes: the config has no vocab_size", hint="pass a checkpoint with config.json")
    if probes_file is not None:
        return _token_id_probes(Path(probes_file), vocab, max_len)
    if task is not None:
        n_task = n_probes // 2
        task_ids = task.batch("validation", 0, n_task, seed)["input_ids"]
        rand = _random_tokens(n_probes - n_task, task_ids.shape[1], vocab, seed)
        ids = torch.cat([task_ids.long(), rand])
        return ProbeSet(
            ids,
            torch.ones_like(ids),
            f"task {task.name}: {n_task} validation inputs + {n_probes - n_task} random-token sequences "
            f"(no tokenizer in the checkpoint; seed {seed})",
        )
    length = min(max_len, 16)
    ids = _random_tokens(n_probes, length, vocab, seed)
    return ProbeSet(ids, torch.ones_like(ids), f"{n_probes} random-token sequences of length {length} (seed {seed})")


# ------------------------------------------------------------------------------------------ fingerprints


@torch.no_grad()
def probe_representations(model: torch.nn.Module, probes: ProbeSet, batch_size: int = 64) -> torch.Tensor:
    """``[n_probes, d]`` float64: per probe, the final hidden state averaged over its real positions."""
    from ckptaudit.tasks.lm import split_model

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # The final hidden states need the trunk only: the LM head (a vocabulary of logits per position) is skipped.
    split = split_model(model)
    runner = split[0] if split is not None else model
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(probes), batch_size):
                ids = probes.input_ids[start : start + batch_size].to(device)
                mask = probes.attention_mask[start : start + batch_size].to(device)
                res = runner(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                hidden = res.hidden_states[-1].double()  # [B, L, d]
                weights = mask.double().unsqueeze(-1)
                out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two fingerprints (flattened), in float64."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


# -------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Thresholds:
    """``rule`` is "adaptive" (percentiles of s_t over the run) or "fixed"; ``low`` / ``high`` the values."""

    rule: str
    low: float
    high: float
    percentiles: tuple[float, float] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rule": self.rule, "low": self.low, "high": self.high}
        if self.percentiles is not None:
            out["percentiles"] = list(self.percentiles)
        return out


def parse_thresholds(spec: str | None) -> tuple[float, float] | None:
    """'0.997,0.9995' -> (0.997, 0.9995); None -> None (adaptive). Requires LOW <= HIGH."""
    if spec is None:
        return None
    try:
        low, high = (float(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"$thresholds={spec}: expected LOW,HIGH", "e.g. $thresholds=0.997,0.9995", param="thresholds") from None
    if low > high:
        raise UsageError(f"$thresholds={spec}: LOW is above HIGH", "e.g. $thresholds=0.997,0.9995",
                         param="thresholds")
    return low, high


def regime_thresholds(
    similarity: Sequence[float], fixed: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> Thresholds:
    """Fixed thresholds when given, else the ``percentiles`` of the finite values of ``similarity``."""
    if fixed is not None:
        return Thresholds("fixed", float(fixed[0]), float(fixed[1]))
    s = np.asarray(similarity, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return Thresholds("adaptive", math.nan, math.nan, tuple(percentiles))
    low, high = np.percentile(s, percentiles)
    return Thresholds("adaptive", float(low), float(high), tuple(percentiles))


def classify(similarity: Sequence[float], thresholds: Thresholds) -> list[str]:
    """Regime per entry: stable if s > high, chaotic if s < low, transition otherwise; unknown where s is NaN."""
    out = []
    for s in similarity:
        if s is None or not math.isfinite(s) or not math.isfinite(thresholds.low):
            out.append(UNKNOWN)
        elif s > thresholds.high:
            out.append("stable")
        elif s < thresholds.low:
            out.append("chaotic")
        else:
            out.append("transition")
    return out


def first_entries(steps: Sequence[int], regimes: Sequence[str]) -> dict[str, int | None]:
    """First step at which each regime occurs (None when never)."""
    out: dict[str, int | None] = dict.fromkeys(REGIMES)
    for step, r in zip(steps, regimes, strict=True):
        if r in out and out[r] is None:
            out[r] = int(step)
    return out


@dataclass(frozen=True)
class RegimesResult(TreeResult):
    """Regimes of one run: per checkpoint ``steps``, ``similarity`` s_t (NaN at the first), ``regime``."""

    steps: tuple[int, ...]
    similarity: tuple[float, ...]
    regime: tuple[str, ...]
    thresholds: Thresholds
    first_entry: dict[str, int | None]
    probes: str
    notes: tuple[str, ...] = field(default=())
    #: activation variance, loss curvature, bootstrap of s_t (:mod:`ckptaudit.analyses.regimes.signals`), or None
    signals: Any = field(default=None, compare=False)

    @classmethod
    def from_similarity(
        cls, steps: Sequence[int], similarity: Sequence[float], fixed: tuple[float, float] | None,
        probes: str = "", notes: Sequence[str] = (),
    ) -> RegimesResult:
        """Thresholds, regimes and first entries from a similarity series (s[0] = NaN)."""
        th = regime_thresholds(similarity, fixed)
        regime = classify(similarity, th)
        return cls(
            tuple(int(s) for s in steps), tuple(float(s) for s in similarity), tuple(regime), th,
            first_entries(steps, regime), probes, tuple(notes),
        )

    def counts(self) -> dict[str, int]:
        """Number of checkpoints per regime (including unknown)."""
        return {r: self.regime.count(r) for r in (*REGIMES, UNKNOWN)}

    JSON_ONLY = frozenset({"notes"})
    HDF5_SKIP_NONE = RegimeSignals.HDF5_SKIP_NONE
    HDF5_LAYOUT = {"first_entry": "_first_entry"}  # the report says -1 for a regime never entered

    def to_tree(self) -> dict:
        """Keys (--json and the report): steps, similarity (NaN / null at the first), regime, thresholds,
        first_entry (null / -1 when never), counts, probes, notes (--json only), and the signals' keys
        (:meth:`RegimeSignals.to_tree`) when they were computed."""
        return {
            "steps": np.asarray(self.steps, dtype=np.int64),
            "similarity": np.asarray(self.similarity, dtype=np.float64), "regime": list(self.regime),
            "thresholds": self.thresholds.to_json(), "first_entry": self.first_entry, "counts": self.counts(),
            "probes": self.probes, "notes": list(self.notes),
            **({} if self.signals is None else self.signals.to_tree()),
        }  # fmt: skip

    @staticmethod
    def _first_entry(first: dict[str, int | None]) -> dict[str, Any]:
        return {"first_entry": {k: (-1 if v is None else v) for k, v in first.items()}}


# -------------------------------------------------------------------------------------------- the run


def run_fingerprints(
    run: Sequence[StoredCheckpoint],
    probes: ProbeSet,
    device: str = "cpu",
    keep: bool = False,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    progress: Callable[[float], None] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[float], list[torch.Tensor] | None, list[float] | None]:
    """One pass over the checkpoints of ``run``: similarity s_t (NaN first), optionally the representations
    ``[n_probes, d]`` of every checkpoint (``keep``) and the validation loss of each (``evaluate``).
    ``observe(rep, previous)`` sees each representation and its predecessor (None first) as they are made.

    One model is built and refilled tensor by tensor (``fill_model``: a checkpoint whose tensor names or shapes
    differ from the first one's is an error); only the previous fingerprint is held unless ``keep``. ``dtype``: the
    model's precision (None: float32).
    """
    from ckptaudit.io.models import load_model

    model = None
    similarity: list[float] = []
    reps: list[torch.Tensor] = []
    losses: list[float] = []
    previous = None
    for ckpt in run:
        if model is None:
            model = load_model(ckpt, device, dtype=dtype)
        else:  # the same model refilled: names and shapes must match the first checkpoint's
            with ckpt.model_tensors(model) as source:
                fill_model(model, source, ckpt.path)
        rep = probe_representations(model, probes)
        similarity.append(math.nan if previous is None else cosine(rep, previous))
        if observe is not None:
            observe(rep, previous)
        previous = rep
        if keep:
            reps.append(rep)
        if evaluate is not None:
            losses.append(float(evaluate(model)))
        if progress is not None:
            progress(1)
    return similarity, (reps if keep else None), (losses if evaluate is not None else None)


def run_regimes(
    run: Sequence[StoredCheckpoint],
    probes: ProbeSet,
    fixed: tuple[float, float] | None = None,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    losses: Sequence[float | None] | None = None,
    loss_source: str = "",
    variance_window: int = 5,
    bootstrap: int = 200,
    seed: int = 0,
    signals: bool = True,
    dtype: torch.dtype | None = None,
) -> RegimesResult:
    """Fingerprints of every checkpoint of ``run``, s_t, thresholds, regimes and first entries, and (``signals``)
    the activation variance over ``variance_window`` checkpoints, the loss curvature and a seeded bootstrap over
    probes (``bootstrap`` replicates, 0: none) — see :mod:`ckptaudit.analyses.regimes.signals`.

    The loss at each checkpoint comes from ``evaluate(model)`` when given (one evaluation per checkpoint, in the
    same pass), else from ``losses`` (one per checkpoint, None where unknown); ``loss_source`` says which in words.
    """
    from ckptaudit.analyses.regimes.signals import SignalCollector

    steps = [int(c.step) for c in run]
    collector = SignalCollector(variance_window) if signals else None
    similarity, _, evaluated = run_fingerprints(run, probes, device, evaluate=evaluate, progress=progress,
                                                observe=collector, dtype=dtype)
    notes = []
    if len(steps) < 3:
        notes.append(f"only {len(steps)} checkpoints: {max(len(steps) - 1, 0)} similarity value(s)")
    result = RegimesResult.from_similarity(steps, similarity, fixed, probes.source, notes)
    if collector is None:
        return result
    if evaluated is not None:
        losses = evaluated
    elif losses is not None and all(v is None for v in losses):
        losses = None
    if losses is None:
        loss_source = loss_source or "no loss: no held-out data (--task / --data) and no eval_loss in trainer_state.json"
    th = result.thresholds
    sig = RegimeSignals.build(steps, collector, result.regime, fixed, th.percentiles or DEFAULT_PERCENTILES, losses,
                              loss_source, n_boot=bootstrap, seed=seed)
    return dataclasses.replace(result, signals=sig)
