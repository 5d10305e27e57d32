"""Next-token loss of a causal language model, with logits only where the loss needs them.

A batch is ``{"input_ids": [B, L], "labels": [B, L], "attention_mask": [B, L]}`` (int64; ``labels`` is -100 on
padding, as the Trainer's collators write it). Position j predicts token j + 1; positions whose target label is
-100 are not predicted.

:func:`next_token_stats` runs the model's trunk once (``model.<base_model_prefix>``: the final hidden states,
after the final norm) and applies the LM head (``get_output_embeddings()``) only to the predicted positions, in
chunks of at most ``LOGIT_CHUNK_BYTES`` of float32 logits: no ``[B, L, V]`` tensor exists at any time, and no
float64 logits at all (cross-entropy is taken in float32 per chunk and summed in float64). With gradients, chunks
are recomputed in the backward pass (``torch.utils.checkpoint``) when keeping them would exceed the budget.

Whether a model's logits really are ``head(trunk(x))`` is checked once per model on a 4-token input against its
own forward; models where they are not (a logit soft-cap, a scaled head, a plain ``nn.Module``) fall back to the
model's own forward and get small batches.

A gradient over a batch whose activations would not fit ``GRAD_ACTIVATION_BYTES`` is taken over micro-batches of
:func:`grad_batch_rows` windows (``TokenData.loss_parts``): each part is a micro-batch's summed cross-entropy divided
by the whole batch's number of predictions, so the parts' gradients sum to the batch's mean-loss gradient (the same
value to float32 rounding, in a fraction of the memory). Batches that fit are taken whole, as before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EVAL_BATCH_TOKENS", "GRAD_ACTIVATION_BYTES", "LOGIT_CHUNK_BYTES", "IGNORE", "eval_batch_rows",
           "grad_batch_rows", "next_token_stats", "predictions", "split_model"]

IGNORE = -100
LOGIT_CHUNK_BYTES = 64 * 1024**2
# Tokens per evaluation batch (activations of the trunk); fewer when the model's own forward must make the logits.
EVAL_BATCH_TOKENS = 8192
# Activations kept for one backward pass; a larger batch is differentiated in micro-batches (grad_batch_rows).
GRAD_ACTIVATION_BYTES = 2 * 1024**3
# Bytes of saved activations per token, layer and hidden unit in a transformer block's backward pass (float32
# inputs of the attention and MLP matmuls, norms, nonlinearities and the attention weights: an upper estimate).
ACTIVATION_BYTES_PER_UNIT = 4 * 36
_SPLIT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(trunk, head) when ``model``'s logits equal ``head(trunk(input_ids).last_hidden_state)`` (checked once per
    model on a 4-token input, to float32 rounding), else None."""
    if model in _SPLIT_OK:
        return _SPLIT_OK[model]
    found = None
    prefix = getattr(model, "base_model_prefix", None)
    trunk = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(trunk, nn.Module) and isinstance(head, nn.Module) and trunk is not model:
        device = next(model.parameters()).device
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        ids = (torch.arange(4, device=device).reshape(1, 4) * 7919) % max(vocab, 1)
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                want = _logits_of(model(input_ids=ids)).float()
                out = trunk(input_ids=ids)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                got = head(h).float()
            scale = float(want.abs().max()) or 1.0
            if got.shape == want.shape and float((got - want).abs().max()) <= 1e-3 * scale:
                found = (trunk, head)
        except Exception:  # noqa: BLE001 - any model that cannot be split this way takes its own forward
            found = None
        finally:
            model.train(was)
    _SPLIT_OK[model] = found
    return found


def eval_batch_rows(model: nn.Module, seq_len: int, vocab: int) -> int:
    """Windows of ``seq_len`` tokens per evaluation batch: EVAL_BATCH_TOKENS of trunk activations, or, when the
    model's own forward makes the logits, one LOGIT_CHUNK_BYTES of them."""
    tokens = EVAL_BATCH_TOKENS if split_model(model) is not None else max(1, LOGIT_CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(1, tokens // max(1, seq_len))


def grad_batch_rows(model: nn.Module, seq_len: int) -> int | None:
    """Windows of ``seq_len`` tokens whose backward-pass activations fit GRAD_ACTIVATION_BYTES, estimated from the
    model's config (num_hidden_layers x hidden_size x ACTIVATION_BYTES_PER_UNIT per token); None when the config does
    not give both (a plain nn.Module: batches are taken whole)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int) or layers <= 0 or hidden <= 0:
        return None
    per_window = ACTIVATION_BYTES_PER_UNIT * layers * hidden * max(1, int(seq_len))
    return max(1, GRAD_ACTIVATION_BYTES // per_window)


def predictions(batch: dict[str, torch.Tensor]) -> int:
    """Next-token predictions of a batch: the targets (labels shifted by one) that are not IGNORE."""
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE).sum())


def top1_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(logits.argmax(-1) == targets).sum()`` exactly (argmax: the first maximal index), with the argmax taken only
    over the rows where it can be the target: those whose target logit equals the row maximum, or whose maximum is
    NaN. A maximum over the vocabulary costs a fraction of an argmax on CPU, and most rows of a model in training
    drop out. logits [N, V], targets [N] -> scalar long tensor."""
    m = logits.amax(dim=-1)
    rows = (logits.gather(-1, targets[:, None]).squeeze(-1) == m) | torch.isnan(m)
    if not bool(rows.any()):
        return torch.zeros((), dtype=torch.long, device=logits.device)
    return (logits[rows].argmax(dim=-1) == targets[rows]).sum()


def _chunk_stats(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                 accuracy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()
    correct = top1_correct(logits, targets) if accuracy else torch.zeros((), dtype=torch.long)
    return F.cross_entropy(logits, targets, reduction="sum"), correct


def next_token_stats(model: nn.Module, batch: dict[str, torch.Tensor],
                     accuracy: bool = True) -> tuple[torch.Tensor, int, int]:
    """(sum of next-token cross-entropies in nats: a scalar tensor, float32 with grad when enabled, else float64; number of
    correct top-1 predictions (0 when ``accuracy`` is False: no argmax over the vocabulary), number of predictions)
    over the batch (see the module docstring)."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    labels = batch.get("labels", batch["input_ids"]).to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    targets = labels[:, 1:]
    keep = targets != IGNORE
    split = split_model(model)
    kwargs = {"attention_mask": mask} if mask is not None else {}
    if split is None:
        logits = _logits_of(model(input_ids=ids, **kwargs))[:, :-1][keep]
        t = targets[keep]
        loss = F.cross_entropy(logits.float(), t, reduction="sum")
        return loss, int(top1_correct(logits, t)) if accuracy else 0, int(t.numel())
    trunk, head = split
    out = trunk(input_ids=ids, **kwargs)
    h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1][keep]
    t = targets[keep]
    n = int(t.numel())
    vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
    grad = torch.is_grad_enabled() and h.requires_grad
    recompute = grad and n * vocab * 4 > 4 * LOGIT_CHUNK_BYTES
    # Summed in float64 when no gradient is wanted (evaluation); a training loss stays in the model's float32.
    total = h.new_zeros((), dtype=torch.float32 if grad else torch.float64)
    correct = 0
    for lo in range(0, n, rows):
        hc, tc = h[lo : lo + rows], t[lo : lo + rows]
        if recompute:
            from torch.utils.checkpoint import checkpoint

            s, c = checkpoint(_chunk_stats, head, hc, tc, accuracy, use_reentrant=False)
        else:
            s, c = _chunk_stats(head, hc, tc, accuracy)
        total = total + (s if grad else s.double())
        correct += int(c)
    return total, correct, n
