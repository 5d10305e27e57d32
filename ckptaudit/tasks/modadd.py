"""Modular addition (a + b mod p): the task behind the project's fixture runs, demos and probes.

Vocabulary: tokens ``0 .. p-1`` are the numbers, ``p`` is "+", ``p + 1`` is "=". A sequence is
``[a, +, b, =]`` and the target ``c = (a + b) mod p`` is predicted at the last position. Loss and accuracy
are taken at that position only, over the logits of the ``p`` number tokens (the operator tokens can never
be an answer, so letting them compete would only blur the loss).

All ``p * p`` pairs are split once, by a seeded permutation, into train and validation. Training batches
are a pure function of ``(split, step, batch_size, seed)``: a run can be resumed bit-exactly at any step
without replaying a sampler, which is what resume-probe and extrapolate rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ckptaudit.sampling import epoch_sample, stable_seed

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ModAdd:
    """The modular-addition task for modulus ``p``.

    ``train_frac`` of the ``p * p`` pairs (rounded) go to the train split, the rest to validation; which ones
    is decided by ``split_seed`` alone.
    """

    p: int = 23
    train_frac: float = 0.5
    split_seed: int = 0
    name: str = field(default="modadd", init=False)
    _pairs: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.p < 2:
            raise ValueError(f"modadd needs p >= 2, got {self.p}")
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"modadd needs 0 < train_frac < 1, got {self.train_frac}")
        n = self.p * self.p
        gen = torch.Generator().manual_seed(stable_seed("modadd-split", self.p, self.split_seed))
        perm = torch.randperm(n, generator=gen)
        n_train = min(max(int(round(self.train_frac * n)), 1), n - 1)
        # Sorted so that eval order (and therefore eval batches) does not depend on the permutation.
        pairs = {
            "train": torch.sort(perm[:n_train]).values,
            "validation": torch.sort(perm[n_train:]).values,
        }
        object.__setattr__(self, "_pairs", pairs)

    # -- vocabulary ------------------------------------------------------------------------------------
    @property
    def plus_token(self) -> int:
        """Id of the "+" token."""
        return self.p

    @property
    def eq_token(self) -> int:
        """Id of the "=" token."""
        return self.p + 1

    @property
    def vocab_size(self) -> int:
        """Numbers, "+" and "="."""
        return self.p + 2

    @property
    def seq_len(self) -> int:
        """Every sequence is ``[a, +, b, =]``."""
        return 4

    @property
    def num_classes(self) -> int:
        """The answer is one of the ``p`` number tokens (chance accuracy is 1 / p)."""
        return self.p

    @staticmethod
    def params_for_vocab(vocab: int) -> dict[str, int] | None:
        """The task parameters that give a vocabulary of ``vocab`` tokens (p = vocab - 2), None when none do."""
        return {"p": vocab - 2} if vocab > 3 else None

    # -- data ------------------------------------------------------------------------------------------
    def split_indices(self, split: str) -> torch.Tensor:
        """Pair indices ``a * p + b`` of ``split`` (sorted, int64)."""
        if split not in self._pairs:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._pairs[split]

    def split_size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return int(self.split_indices(split).numel())

    def encode(self, pair_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pair indices -> ``{"input_ids": [B, 4] int64, "labels": [B] int64}``."""
        pair_index = pair_index.to(torch.long)
        a = torch.div(pair_index, self.p, rounding_mode="floor")
        b = pair_index % self.p
        ids = torch.stack(
            [a, torch.full_like(a, self.plus_token), b, torch.full_like(a, self.eq_token)], dim=1
        )
        return {"input_ids": ids, "labels": (a + b) % self.p}

    def batch(self, split: str, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """The batch of optimizer step ``step``; a pure function of ``(split, step, batch_size, seed)``.

        Examples are drawn epoch by epoch without replacement: global position ``i = step * batch_size + j``
        falls in epoch ``i // n`` and takes element ``i % n`` of that epoch's seeded permutation, so every
        example is seen once per epoch and any step can be reproduced without replaying earlier ones.
        """
        idx = self.split_indices(split)
        return self.encode(idx[epoch_sample(idx.numel(), step, batch_size, "modadd-epoch", split, seed)])

    def batches(
        self, split: str, batch_size: int, seed: int, n: int, start: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of steps ``start .. start + n - 1`` (see ``batch``)."""
        for step in range(start, start + n):
            yield self.batch(split, step, batch_size, seed)

    def eval_batches(self, split: str, batch_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """The whole of ``split`` in a fixed order, in batches of at most ``batch_size``."""
        idx = self.split_indices(split)
        for start in range(0, idx.numel(), batch_size):
            yield self.encode(idx[start : start + batch_size])

    # -- model -----------------------------------------------------------------------------------------
    def answer_logits(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, p]`` of the number tokens at the last position."""
        out = model(input_ids=input_ids)
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, -1, : self.p]

    def _logits_labels(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        logits = self.answer_logits(model, batch["input_ids"].to(device))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32; float64 stays
        return logits, batch["labels"].to(device)

    def loss_and_accuracy(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy (a tensor with grad, nats) and accuracy (float in [0, 1]) of ``batch``."""
        logits, labels = self._logits_labels(model, batch)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean().item()
        return loss, acc

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean cross-entropy of :meth:`loss_and_accuracy` alone (what a training step needs)."""
        return F.cross_entropy(*self._logits_labels(model, batch))

    def evaluate(self, model: torch.nn.Module, split: str = "validation") -> tuple[float, float]:
        """Loss (nats) and accuracy over the whole of ``split``, under ``no_grad`` in eval mode.

        The model's train/eval mode is restored afterwards.
        """
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in self.eval_batches(split):
                logits = self.answer_logits(model, batch["input_ids"].to(device)).double()
                labels = batch["labels"].to(device)
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(dim=-1) == labels).sum().item())
                count += labels.numel()
        model.train(was_training)
        return total_loss / count, correct / count

    def model_config(self, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, **overrides):
        """A ``transformers.GPT2Config`` sized for this task.

        ``n_positions = seq_len``, vocabulary = the task's, every dropout 0 (training must be deterministic),
        tied input/output embeddings. ``overrides`` go to ``GPT2Config`` unchanged.
        """
        from transformers import GPT2Config

        kwargs = dict(
            vocab_size=self.vocab_size,
            n_positions=self.seq_len,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            # GPT-2's defaults (50256) lie outside this vocabulary; "=" is the closest thing to a BOS/EOS.
            bos_token_id=self.eq_token,
            eos_token_id=self.eq_token,
        )
        kwargs.update(overrides)
        return GPT2Config(**kwargs)

    def task_spec(self, batch_size: int | None = None, data_seed: int | None = None) -> dict:
        """The JSON-able description written into each checkpoint as ``ckptaudit_task.json``."""
        spec = {"task": self.name, "p": self.p, "train_frac": self.train_frac, "split_seed": self.split_seed}
        if batch_size is not None:
            spec["batch_size"] = int(batch_size)
        if data_seed is not None:
            spec["data_seed"] = int(data_seed)
        return spec
