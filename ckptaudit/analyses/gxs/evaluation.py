"""Evaluation sets and the slack probe of `gxs` (SPEC section 4, paper 000 section 3.2).

An *evaluator* says which logits are answers and which class is correct:

- :class:`TaskEval`: a built-in task's split (modular addition: the ``p`` number logits at the last position,
  through the task's own ``answer_logits``, so loss, accuracy and margin follow ``loss_and_accuracy``);
- :class:`WindowEval`: the windows of a ``--data`` file (:class:`ckptaudit.tasks.data.TokenData`, one split, capped by
  ``--eval-tokens``), next-token prediction at every real position (padding excluded);
- :class:`TokenEval`: token-id sequences as given (``--as-given``), next-token prediction at every position.

Logits are reduced in row chunks in float64 (at most ``ROW_CHUNK`` rows at a time), and batches hold at most
``LOGIT_CHUNK_BYTES`` of float32 logits (at least one sequence), so memory does not grow with the vocabulary
times the evaluation set.

Margin of one example: m = z_correct - max_{j != correct} z_j over the answer logits (positive iff correct,
up to ties). The slack probe intervenes on the final residual stream h (after the final norm, before the
unembedding): h' = alpha * h + sigma * rms(h) * eps, rms over the hidden dimension of each position,
eps ~ N(0, I) drawn from a generator seeded by (seed, batch index) alone, so every cell of the grid sees the same
noise directions (common random numbers make the cells comparable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ckptaudit.errors import DataError, UsageError
from ckptaudit.report.tree import TreeResult
from ckptaudit.sampling import stable_seed

ALPHAS: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2)
SIGMAS: tuple[float, ...] = (0.0, 0.3, 1.0, 2.0, 3.0)

ROW_CHUNK = 1024


def _rows_per_batch(seq_len: int, vocab: int) -> int:
    from ckptaudit.tasks.lm import LOGIT_CHUNK_BYTES

    return max(1, LOGIT_CHUNK_BYTES // (4 * max(vocab, 1) * max(seq_len - 1, 1)))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------- evaluators


@dataclass(frozen=True)
class TaskEval:
    """A built-in task's split. ``answer_logits`` goes through ``task.answer_logits`` (its own conventions)."""

    task: Any
    split: str = "validation"
    batch_size: int = 4096

    @property
    def name(self) -> str:
        """Label used in reports."""
        return f"{getattr(self.task, 'name', 'task')}:{self.split}"

    def n_batches(self) -> int:
        """How many batches :meth:`batches` yields."""
        return -(-int(self.task.split_size(self.split)) // self.batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [B, T], labels [B]) in a fixed order."""
        for b in self.task.eval_batches(self.split, self.batch_size):
            yield b["input_ids"], b["labels"]

    def answer_logits(self, model: Callable, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], row index into the batch's labels) — for a task one answer per sequence."""
        logits = self.task.answer_logits(model, input_ids)
        return logits, torch.arange(logits.shape[0])


@dataclass(frozen=True)
class WindowEval:
    """The used windows of one split of file data; next-token prediction at every real (unpadded) position."""

    data: Any
    split: str = "validation"

    @property
    def name(self) -> str:
        """Label used in reports."""
        return f"{Path(self.data.source).name}:{self.split} ({self.data.split_size(self.split)} windows)"

    def n_batches(self) -> int:
        """How many batches :meth:`batches` yields."""
        return -(-self.data.split_size(self.split) // _rows_per_batch(self.data.seq_len, self.data.vocab_size))

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [B, T], labels [B * (T - 1)], -100 on padding) in file order."""
        rows = _rows_per_batch(self.data.seq_len, self.data.vocab_size)
        for b in self.data.eval_batches(self.split, rows):
            yield b["input_ids"], b["labels"][:, 1:].reshape(-1)

    def answer_logits(self, model: Callable, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B * (T - 1), V], row index)."""
        out = model(input_ids=input_ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        return logits, torch.arange(logits.shape[0])


@dataclass(frozen=True)
class TokenEval:
    """Token-id sequences; next-token prediction at every position (answers: the whole vocabulary)."""

    sequences: tuple[tuple[int, ...], ...]
    batch_size: int = 16
    label: str = "tokens"

    @property
    def name(self) -> str:
        """Label used in reports."""
        return self.label

    def n_batches(self) -> int:
        """How many batches :meth:`batches` yields."""
        return sum(1 for _ in self.batches())

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [B, T], labels [B * (T - 1)]); sequences of equal length are batched together."""
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for s in self.sequences:
            by_len.setdefault(len(s), []).append(s)
        vocab = max(max(s) for s in self.sequences) + 1
        for n in sorted(by_len):
            group = by_len[n]
            size = min(self.batch_size, _rows_per_batch(n, vocab))
            for i in range(0, len(group), size):
                ids = torch.tensor(group[i : i + size], dtype=torch.long)
                yield ids, ids[:, 1:].reshape(-1)

    def answer_logits(self, model: Callable, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B * (T - 1), V], row index)."""
        out = model(input_ids=input_ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        return logits, torch.arange(logits.shape[0])


def load_token_data(path: Path, ckpt: Any, max_sequences: int | None = None) -> TokenEval:
    """The sequences of a --data file (:func:`ckptaudit.tasks.data.load_sequences`: .npy, JSON/JSONL ids, JSONL
    text, or text lines; text through ``ckpt``'s tokenizer) as a :class:`TokenEval`."""
    from ckptaudit.tasks.data import load_sequences

    return TokenEval(tuple(load_sequences(ckpt, path, max_sequences)), label=Path(path).name)


def check_vocab(model: nn.Module, evaluator: Any) -> None:
    """Token ids beyond the model's embedding table (or sequences beyond its context) are a user error, not an
    index crash. Window data is checked when it is read."""
    if not isinstance(evaluator, TokenEval):
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max(max(s) for s in evaluator.sequences)
    if top >= vocab:
        raise DataError(f"$data holds token id {top}, the model's vocabulary has {vocab}",
                        "the data was tokenized for another model", param="data")
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    longest = max(len(s) for s in evaluator.sequences)
    if limit is not None and longest > limit:
        raise DataError(f"$data holds a sequence of {longest} tokens, the model takes at most {limit}",
                        "drop $as_given to cut the data into $seq_len windows, or give shorter sequences", param="data")


def margins_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """m = z_correct - max_{j != correct} z_j per row (float64). logits [N, C], labels [N]."""
    z = logits.double()
    correct = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), float("-inf"))
    return correct - others.max(dim=1).values


@dataclass(frozen=True)
class EvalStats:
    """Loss (mean cross-entropy, nats), accuracy, mean margin (logit units) and the number of answers."""

    loss: float
    accuracy: float
    margin: float
    n: int


def _reduce(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, float, int]:
    """(sum of cross-entropies, correct, sum of margins, answers) over the rows whose label is not -100, in row
    chunks of ROW_CHUNK taken to float64."""
    keep = y != -100
    if not bool(keep.all()):
        logits, y = logits[keep], y[keep]
    total, correct, msum = 0.0, 0, 0.0
    for lo in range(0, int(y.numel()), ROW_CHUNK):
        z, t = logits[lo : lo + ROW_CHUNK].double(), y[lo : lo + ROW_CHUNK]
        total += F.cross_entropy(z, t, reduction="sum").item()
        correct += int((z.argmax(dim=1) == t).sum().item())
        msum += float(margins_of(z, t).sum().item())
    return total, correct, msum, int(y.numel())


def _reduce_by_sequence(logits: torch.Tensor, y: torch.Tensor, n_seq: int) -> np.ndarray:
    """[4, n_seq]: per input sequence the sums of cross-entropies, correct answers and margins, and the number of
    answers (rows whose label is not -100). The answer rows are sequence-major, as every evaluator lays them out
    (row r belongs to sequence r * n_seq // rows), and are taken to float64 in chunks of ROW_CHUNK."""
    rows = int(y.numel())
    seq = torch.arange(rows, device=y.device) * n_seq // max(rows, 1)
    out = torch.zeros((4, n_seq), dtype=torch.float64, device=y.device)
    for lo in range(0, rows, ROW_CHUNK):
        z, t, g = logits[lo : lo + ROW_CHUNK].double(), y[lo : lo + ROW_CHUNK], seq[lo : lo + ROW_CHUNK]
        keep = t != -100
        z, t, g = z[keep], t[keep], g[keep]
        if not t.numel():
            continue
        for q, v in enumerate((F.cross_entropy(z, t, reduction="none"), (z.argmax(dim=1) == t).double(),
                               margins_of(z, t), torch.ones_like(t, dtype=torch.float64))):
            out[q].index_add_(0, g, v)
    return out.cpu().numpy()


def evaluate(model: nn.Module, evaluator: Any) -> EvalStats:
    """Loss, accuracy and mean margin of ``model`` on ``evaluator`` (inference mode, float64 accumulation)."""
    check_vocab(model, evaluator)
    device = _device_of(model)
    total, correct, msum, count = 0.0, 0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for ids, labels in evaluator.batches():
                logits, rows = evaluator.answer_logits(model, ids.to(device))
                t, c, m, n = _reduce(logits, labels.to(device)[rows.to(device)])
                total, correct, msum, count = total + t, correct + c, msum + m, count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError(f"evaluation set {evaluator.name} is empty", None)
    return EvalStats(total / count, correct / count, msum / count, count)


# ------------------------------------------------------------------------------------------- slack probe


def final_residual_site(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(module name, module, "output" | "input"): where h (after the final norm, before the unembedding) is.

    The final norm named by the model's architecture file (``final_norm``: GPT-2 ``transformer.ln_f``, LLaMA
    ``model.norm``, NeoX ``gpt_neox.final_layer_norm``...) is hooked on its output; otherwise the LM head
    (``get_output_embeddings``) is hooked on its input.
    """
    from ckptaudit.io.roles import family_of_model

    modules = dict(model.named_modules())
    family = family_of_model(model)
    for name in family.final_norm if family is not None else ():
        if name in modules:
            return name, modules[name], "output"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UsageError(f"{type(model).__name__}: no final norm and no LM head found for the slack probe",
                         "the slack probe needs a model with an unembedding (a causal LM head)")
    name = next(n for n, m in modules.items() if m is head)
    return name, head, "input"


@dataclass(frozen=True, eq=False)
class SlackResult(TreeResult):
    """The slack grid. accuracy / margin: arrays [len(alpha), len(sigma)]; margin = mean margin (logit units).
    no_gain_reflex[i]: margin does not increase with sigma at alpha[i] (non-increasing along the row).
    accuracy_se / margin_se / loss_se: standard errors of the cells over the n_units input sequences
    (:func:`ratio_se`), None with a single sequence."""

    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    accuracy: np.ndarray
    margin: np.ndarray
    loss: np.ndarray
    no_gain_reflex: tuple[bool, ...]
    site: str
    site_kind: str
    evaluator: str
    n: int
    seed: int
    checkpoint: str = ""
    accuracy_se: np.ndarray | None = None
    margin_se: np.ndarray | None = None
    loss_se: np.ndarray | None = None
    n_units: int = 0

    def _errors(self) -> dict[str, Any]:
        return {f"{k}_se": getattr(self, f"{k}_se") for k in ("accuracy", "margin", "loss")}

    HDF5_SKIP_NONE = frozenset({"accuracy_se", "margin_se", "loss_se"})  # no errors from a single sequence

    def to_tree(self) -> dict[str, Any]:
        """Keys (--json and /gxs/slack): alpha, sigma, accuracy (grid), margin (grid), loss (grid), their standard
        errors accuracy_se, margin_se, loss_se (grids; null in --json and absent from the report with one input
        sequence), no_gain_reflex (per alpha), site, site_kind, eval, n, n_units (input sequences), seed,
        checkpoint."""
        return {"checkpoint": self.checkpoint, "alpha": np.asarray(self.alpha), "sigma": np.asarray(self.sigma),
                "accuracy": self.accuracy, "margin": self.margin, "loss": self.loss, **self._errors(),
                "no_gain_reflex": np.asarray(self.no_gain_reflex, dtype=bool), "site": self.site,
                "site_kind": self.site_kind, "eval": self.evaluator, "n": self.n, "n_units": self.n_units,
                "seed": self.seed}


def ratio_se(totals: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """Standard error of the ratio R = sum_b y_b / sum_b k_b over B units (``totals`` [B, ...] the per-unit sums
    y_b, ``counts`` [B] the answers k_b): sqrt(B / (B - 1) * sum_b (y_b - R k_b)^2) / sum_b k_b, the linearised
    (cluster) standard error. The slack probe's unit is the input sequence: each has its own rows of the noise, and
    the answers within one sequence are not independent. None for B < 2."""
    totals, counts = np.asarray(totals, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    B = counts.shape[0]
    if B < 2 or counts.sum() <= 0:
        return None
    k = counts.reshape((B,) + (1,) * (totals.ndim - 1))
    ratio = totals.sum(axis=0) / counts.sum()
    return np.sqrt(B / (B - 1) * ((totals - ratio * k) ** 2).sum(axis=0)) / counts.sum()


def run_slack(model: nn.Module, evaluator: Any, alphas: Sequence[float] = ALPHAS, sigmas: Sequence[float] = SIGMAS,
              seed: int = 0, progress: Callable[[int], None] | None = None, checkpoint: str = "") -> SlackResult:
    """Accuracy, loss and mean margin for every (alpha, sigma) cell (one forward pass of the eval set per cell).

    The intervention is a hook on the final residual site (:func:`final_residual_site`); the model is left
    unchanged afterwards. Deterministic given ``seed``.
    """
    check_vocab(model, evaluator)
    alphas, sigmas = tuple(float(a) for a in alphas), tuple(float(s) for s in sigmas)
    if not alphas or not sigmas:
        raise UsageError("the slack grid needs at least one alpha and one sigma", None)
    device = _device_of(model)
    site, module, kind = final_residual_site(model)
    state: dict[str, Any] = {"alpha": 1.0, "sigma": 0.0, "eps": None, "capture": None}

    def intervene(h: torch.Tensor) -> torch.Tensor | None:
        if state["capture"] is not None:  # the clean pass that learns the shape of h: leave h alone
            state["capture"].append(tuple(h.shape))
            return None
        eps = state["eps"]
        if eps.shape != h.shape:
            raise RuntimeError(f"slack probe: hooked tensor {tuple(h.shape)} != noise {tuple(eps.shape)}")
        rms = h.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return state["alpha"] * h + state["sigma"] * rms * eps.to(h.dtype)

    if kind == "output":
        handle = module.register_forward_hook(lambda _m, _i, out: intervene(out))
    else:
        def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
            new = intervene(args[0])
            return None if new is None else (new, *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    shape = (len(alphas), len(sigmas))
    per_seq: list[np.ndarray] = []  # [n_seq, 3, A, S] per batch: per sequence sums of losses, correct, margins
    answers: list[np.ndarray] = []  # [n_seq] answers per sequence
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b, (ids, labels) in enumerate(evaluator.batches()):
                ids = ids.to(device)
                state["capture"] = []
                evaluator.answer_logits(model, ids)
                shapes, state["capture"] = state["capture"], None
                if len(shapes) != 1:
                    raise UsageError(f"slack probe: {site} ran {len(shapes)} times in one forward pass",
                                     "the final-norm site must run once per forward pass")
                gen = torch.Generator(device="cpu").manual_seed(stable_seed("gxs-slack", seed, b))
                state["eps"] = torch.randn(shapes[0], generator=gen, dtype=torch.float32).to(device)
                n_seq = int(ids.shape[0])
                sums = np.zeros((n_seq, 3, *shape))
                for i, a in enumerate(alphas):
                    for j, s in enumerate(sigmas):
                        state["alpha"], state["sigma"] = a, s
                        logits, rows = evaluator.answer_logits(model, ids)
                        red = _reduce_by_sequence(logits, labels.to(device)[rows.to(device)], n_seq)
                        sums[:, :, i, j] = red[:3].T
                        if progress is not None:
                            progress(1)
                per_seq.append(sums)
                answers.append(red[3])
    finally:
        handle.remove()
        model.train(was_training)
    counts = np.concatenate(answers) if answers else np.zeros(0)
    n = int(counts.sum())
    if n == 0:
        raise DataError(f"evaluation set {evaluator.name} is empty", None)
    used = counts > 0  # sequences without an answer (all padding) are not units
    stacked, counts = np.concatenate(per_seq)[used], counts[used]  # [U, 3, A, S], [U]
    loss, correct, msum = stacked.sum(axis=0)
    margin = msum / n
    reflex = tuple(bool(np.all(np.diff(margin[i]) <= 0)) for i in range(len(alphas)))
    loss_se, acc_se, margin_se = (ratio_se(stacked[:, q], counts) for q in range(3))
    return SlackResult(alphas, sigmas, correct / n, margin, loss / n, reflex, site, kind, evaluator.name, n, seed,
                       checkpoint, acc_se, margin_se, loss_se, len(counts))
