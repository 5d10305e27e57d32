"""The architecture registry: tensor-name rules for the model families ckptaudit knows (SPEC §0).

Each rule is a regex over the full tensor name. Every pattern starts with ``(?:^|\\.)`` so that any prefix
(``transformer.``, Lightning's ``model.`` / ``net.``, DDP's ``module.``) still matches, and ends with the
parameter kind (``weight`` / ``bias``) in a group named ``kind``. A group named ``block`` captures the
layer index. ``roles.py`` turns a matched rule into :class:`~ckptaudit.io.roles.Piece` objects.

Head layout of the attention projections (needed for per-head slicing):

- ``head_axis``: the axis of the stored tensor along which heads lie, as consecutive runs of ``head_dim``
  (Linear ``[out, in]``: rows for q/k/v, columns for o; Conv1D ``[in, out]``: the other way round).
- fused tensors (``fused="gpt2_qkv"`` / ``"neox_qkv"``) are split by ``roles.py`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = r"(?P<block>\d+)"
_KIND = r"\.(?P<kind>weight|bias)$"


@dataclass(frozen=True)
class Rule:
    """One tensor-name rule of an architecture.

    ``role`` is the role of the whole tensor (ignored when ``fused`` is set). ``weight_head_axis`` /
    ``bias_head_axis``: see the module docstring (None = not sliceable per head, e.g. the output bias).
    ``signature``: whether a match is evidence for this architecture (generic norm/buffer rules are not).
    """

    pattern: re.Pattern
    role: str
    fused: str | None = None
    weight_head_axis: int | None = None
    bias_head_axis: int | None = None
    signature: bool = True


@dataclass(frozen=True)
class ArchSpec:
    """A named architecture: its rules, tried in order (first match wins)."""

    name: str
    rules: tuple[Rule, ...]


def _rule(body: str, role: str, *, kind: bool = True, flags: int = 0, **kw) -> Rule:
    """Compile ``(?:^|\\.)`` + body (+ ``.weight|.bias``) into a Rule."""
    return Rule(re.compile(r"(?:^|\.)" + body + (_KIND if kind else "$"), flags), role, **kw)


# Norms the explicit rules do not name (q_norm/k_norm of Qwen3/OLMo2, extra sandwich norms...): still "norm".
_GENERIC_NORM = _rule(r"(?:[A-Za-z0-9_]*norm[A-Za-z0-9_]*|ln_[A-Za-z0-9_]+)", "norm", flags=re.IGNORECASE,
                      signature=False)
# Rotary frequency buffers of old checkpoints: never trunk.
_ROTARY = _rule(r"rotary_emb\.inv_freq", "other", kind=False, signature=False)

GPT2 = ArchSpec("gpt2", (
    # Conv1D weight [d, 3d]: columns Q | K | V; bias [3d] likewise.
    _rule(rf"h\.{_BLOCK}\.attn\.c_attn", "qkv", fused="gpt2_qkv"),
    # Conv1D [d, d]: input rows [h*dh, (h+1)*dh) read head h's output.
    _rule(rf"h\.{_BLOCK}\.attn\.c_proj", "o", weight_head_axis=0),
    _rule(rf"h\.{_BLOCK}\.mlp\.c_fc", "mlp_in"),
    _rule(rf"h\.{_BLOCK}\.mlp\.c_proj", "mlp_out"),
    _rule(rf"h\.{_BLOCK}\.ln_[12]", "norm"),
    _rule(r"ln_f", "norm"),
    _rule(r"wte", "embed"),
    _rule(r"wpe", "pos"),
    _rule(r"lm_head", "head", signature=False),
    # Causal-mask buffers saved by transformers < 4.36.
    _rule(rf"h\.{_BLOCK}\.attn\.(?:masked_)?bias", "other", kind=False, signature=False),
    _GENERIC_NORM,
))

GPT_NEOX = ArchSpec("gpt_neox", (
    # Linear weight [3d, d]: rows interleaved per head, viewed as [n_heads, 3, dh, d].
    _rule(rf"layers\.{_BLOCK}\.attention\.query_key_value", "qkv", fused="neox_qkv"),
    _rule(rf"layers\.{_BLOCK}\.attention\.dense", "o", weight_head_axis=1),
    _rule(rf"layers\.{_BLOCK}\.mlp\.dense_h_to_4h", "mlp_in"),
    _rule(rf"layers\.{_BLOCK}\.mlp\.dense_4h_to_h", "mlp_out"),
    _rule(rf"layers\.{_BLOCK}\.(?:input_layernorm|post_attention_layernorm)", "norm"),
    _rule(r"final_layer_norm", "norm"),
    _rule(r"embed_in", "embed"),
    _rule(r"embed_out", "head"),  # Pythia / transformers < 5
    _rule(r"lm_head", "head", signature=False),
    _rule(rf"layers\.{_BLOCK}\.attention\.(?:masked_)?bias", "other", kind=False, signature=False),
    _ROTARY,
    _GENERIC_NORM,
))

LLAMA = ArchSpec("llama", (
    # Linear [out, in]: q/k/v heads are row runs (k/v have n_kv_heads of them), o heads are column runs.
    _rule(rf"layers\.{_BLOCK}\.self_attn\.q_proj", "q", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layers\.{_BLOCK}\.self_attn\.k_proj", "k", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layers\.{_BLOCK}\.self_attn\.v_proj", "v", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layers\.{_BLOCK}\.self_attn\.o_proj", "o", weight_head_axis=1),
    _rule(rf"layers\.{_BLOCK}\.mlp\.(?:gate_proj|up_proj)", "mlp_in"),
    _rule(rf"layers\.{_BLOCK}\.mlp\.down_proj", "mlp_out"),
    _rule(rf"layers\.{_BLOCK}\.(?:input_layernorm|post_attention_layernorm)", "norm"),
    _rule(r"embed_tokens", "embed"),
    _rule(r"lm_head", "head", signature=False),
    _ROTARY,
    _GENERIC_NORM,
))

BERT = ArchSpec("bert", (
    _rule(rf"layer\.{_BLOCK}\.attention\.self\.query", "q", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layer\.{_BLOCK}\.attention\.self\.key", "k", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layer\.{_BLOCK}\.attention\.self\.value", "v", weight_head_axis=0, bias_head_axis=0),
    _rule(rf"layer\.{_BLOCK}\.attention\.output\.dense", "o", weight_head_axis=1),
    _rule(rf"layer\.{_BLOCK}\.intermediate\.dense", "mlp_in"),
    _rule(rf"layer\.{_BLOCK}\.output\.dense", "mlp_out"),
    _rule(rf"layer\.{_BLOCK}\.(?:attention\.)?output\.LayerNorm", "norm"),
    _rule(r"embeddings\.word_embeddings", "embed"),
    _rule(r"embeddings\.position_embeddings", "pos"),
    _rule(r"embeddings\.token_type_embeddings", "other"),  # segment embeddings: neither token nor position
    _rule(r"embeddings\.LayerNorm", "norm"),
    # Integer index buffers of BertEmbeddings.
    _rule(r"embeddings\.(?:position_ids|token_type_ids)", "other", kind=False, signature=False),
    _rule(r"pooler\.dense", "other", signature=False),
    _GENERIC_NORM,  # before cls.*: the MLM head's transform LayerNorm is still a norm
    _rule(r"cls\.[A-Za-z0-9_.]+", "head", kind=False, signature=False),
))

REGISTRY: tuple[ArchSpec, ...] = (GPT2, GPT_NEOX, LLAMA, BERT)
KNOWN_NAMES = "GPT-2, GPT-NeoX/Pythia, LLaMA/Mistral/Qwen2/SmolLM, BERT"


def match_rule(spec: ArchSpec, name: str) -> tuple[Rule, re.Match] | None:
    """The first rule of ``spec`` whose pattern matches ``name`` (searched, so any prefix is allowed)."""
    for rule in spec.rules:
        m = rule.pattern.search(name)
        if m is not None:
            return rule, m
    return None


def recognise(names: list[str]) -> ArchSpec | None:
    """The architecture with the most signature matches among ``names`` (None when no signature matches)."""
    best, best_count = None, 0
    for spec in REGISTRY:
        count = 0
        for name in names:
            hit = match_rule(spec, name)
            count += hit is not None and hit[0].signature
        if count > best_count:
            best, best_count = spec, count
    return best
