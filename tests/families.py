"""Tiny random models of every architecture family, built from their transformers configs (one table).

``FAMILIES`` maps a family name (as ckptaudit reports it) to a builder. Every model has 2 layers, hidden size
32, 4 attention heads (2 key/value heads wherever the family has grouped-query attention), vocabulary 40 and
32 positions; MoE families have 4 experts. ``build(name)`` returns the model in eval mode with eager attention
(so that attention probabilities come back), and with non-zero biases and norms (so that slicing mistakes in
them show). ``NanoGPT`` is a faithful minimal copy of nanoGPT's model (its module names, nn.Linear layout and
attention arithmetic), since nanoGPT is not a package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()

D, N_HEADS, N_KV, N_LAYERS, VOCAB, POS, FF, N_EXPERTS = 32, 4, 2, 2, 40, 32, 64, 4
_BASE = dict(hidden_size=D, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS, vocab_size=VOCAB,
             intermediate_size=FF, max_position_embeddings=POS, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_GQA = dict(_BASE, num_key_value_heads=N_KV)


@dataclass(frozen=True)
class Spec:
    """How to build one family's model: transformers config class and model class (names), config kwargs, and
    the MLP of a block for the trunk arithmetic of the tests: "gated" (3 d ff), "plain" (2 d ff), "plain4d"
    (2 d 4d), "experts" (E 3 d ff_expert, plus a shared expert when the config has one)."""

    config: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mlp: str = "gated"
    causal: bool = True


SPECS: dict[str, Spec] = {
    "gpt2": Spec("GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_head=N_HEADS, n_layer=N_LAYERS, vocab_size=VOCAB,
                                                       n_positions=POS, bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    "gpt_neox": Spec("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_BASE), mlp="plain"),
    "gptj": Spec("GPTJConfig", "GPTJForCausalLM", dict(n_embd=D, n_head=N_HEADS, n_layer=N_LAYERS, vocab_size=VOCAB,
                                                       n_positions=POS, rotary_dim=4, bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    "bloom": Spec("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_head=N_HEADS, n_layer=N_LAYERS,
                                                          vocab_size=VOCAB, bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    "falcon": Spec("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_attention_heads=N_HEADS,
                                                             num_hidden_layers=N_LAYERS, vocab_size=VOCAB,
                                                             new_decoder_architecture=True, num_kv_heads=N_KV,
                                                             bias=True, bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    # Falcon-7B's multi-query attention and the original multi-head layout share the one fused layout.
    "falcon_mqa": Spec("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_attention_heads=N_HEADS,
                                                                 num_hidden_layers=N_LAYERS, vocab_size=VOCAB,
                                                                 multi_query=True, parallel_attn=True,
                                                                 bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    "falcon_mha": Spec("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_attention_heads=N_HEADS,
                                                                 num_hidden_layers=N_LAYERS, vocab_size=VOCAB,
                                                                 multi_query=False, parallel_attn=False, bias=True,
                                                                 bos_token_id=0, eos_token_id=0), mlp="plain4d"),
    "llama": Spec("LlamaConfig", "LlamaForCausalLM", dict(_GQA, attention_bias=True, tie_word_embeddings=False)),
    "mistral": Spec("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=POS)),
    "mixtral": Spec("MixtralConfig", "MixtralForCausalLM", dict(_GQA, num_local_experts=N_EXPERTS,
                                                                num_experts_per_tok=2), mlp="experts"),
    "qwen2": Spec("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA)),
    "qwen2_moe": Spec("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_GQA, num_experts=N_EXPERTS, num_experts_per_tok=2,
                                                                    moe_intermediate_size=16,
                                                                    shared_expert_intermediate_size=32), mlp="experts"),
    "qwen3": Spec("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=8)),
    "qwen3_moe": Spec("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_GQA, head_dim=8, num_experts=N_EXPERTS,
                                                                    num_experts_per_tok=2, moe_intermediate_size=16), mlp="experts"),
    "gemma": Spec("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=8)),
    "gemma2": Spec("Gemma2Config", "Gemma2ForCausalLM", dict(_GQA, head_dim=8, sliding_window=POS)),
    "gemma3": Spec("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GQA, head_dim=8, sliding_window=POS)),
    "phi": Spec("PhiConfig", "PhiForCausalLM", dict(_BASE), mlp="plain"),
    "phi3": Spec("Phi3Config", "Phi3ForCausalLM", dict(_GQA)),
    "olmo": Spec("OlmoConfig", "OlmoForCausalLM", dict(_BASE)),
    "olmo2": Spec("Olmo2Config", "Olmo2ForCausalLM", dict(_BASE, num_key_value_heads=N_KV)),
    "stablelm": Spec("StableLmConfig", "StableLmForCausalLM", dict(_GQA)),
    "starcoder2": Spec("Starcoder2Config", "Starcoder2ForCausalLM", dict(_GQA), mlp="plain"),
    "bert": Spec("BertConfig", "BertForMaskedLM", dict(_BASE), mlp="plain", causal=False),
    "roberta": Spec("RobertaConfig", "RobertaForMaskedLM", dict(_BASE, max_position_embeddings=POS + 2, pad_token_id=1),
                    mlp="plain", causal=False),
}
FAMILIES: tuple[str, ...] = (*SPECS, "nanogpt", "fixture")


# ------------------------------------------------------------------------------------------------ nanoGPT


@dataclass
class NanoGPTConfig:
    """nanoGPT's GPTConfig (model_args of its ckpt.pt)."""

    block_size: int = POS
    vocab_size: int = VOCAB
    n_layer: int = N_LAYERS
    n_head: int = N_HEADS
    n_embd: int = D
    dropout: float = 0.0
    bias: bool = True


class _LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.register_buffer("bias", torch.tril(torch.ones(cfg.block_size, cfg.block_size))
                             .view(1, 1, cfg.block_size, cfg.block_size))
        self.last_att = None

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = nn.functional.softmax(att, dim=-1)
        self.last_att = att
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class _MLP(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.ln_1 = _LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = _CausalSelfAttention(cfg)
        self.ln_2 = _LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = _MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: transformer.{wte, wpe, h, ln_f} and a tied lm_head; ``forward(ids)`` -> logits."""

    def __init__(self, cfg: NanoGPTConfig | None = None):
        super().__init__()
        cfg = cfg or NanoGPTConfig()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layer)]), ln_f=_LayerNorm(cfg.n_embd, cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def attentions(self, idx) -> list[torch.Tensor]:
        """Attention probabilities per layer, [batch, heads, T, T], from one forward pass."""
        self.forward(idx)
        return [block.attn.last_att for block in self.transformer.h]

    def model_args(self) -> dict[str, Any]:
        c = self.config
        return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=c.bias,
                    vocab_size=c.vocab_size, dropout=c.dropout)


# ------------------------------------------------------------------------------------------------ building


def config_of(name: str) -> Any:
    """The transformers config of family ``name`` (the fixture model's GPT-2 config for "fixture")."""
    if name == "fixture":
        from ckptaudit.tasks.modadd import ModAdd

        # The task's own GPT-2 config, widened to the shared vocabulary and positions of these tests.
        return ModAdd(p=7).model_config(n_embd=D, n_layer=N_LAYERS, n_head=N_HEADS, vocab_size=VOCAB, n_positions=POS)
    spec = SPECS[name]
    return getattr(transformers, spec.config)(**spec.kwargs)


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny random model of family ``name`` (see the module docstring)."""
    torch.manual_seed(seed)
    if name == "nanogpt":
        model = NanoGPT()
    else:
        cls = getattr(transformers, SPECS[name].model if name in SPECS else "GPT2LMHeadModel")
        config = config_of(name)
        config._attn_implementation = "eager"
        model = cls(config)
        model.config._attn_implementation = "eager"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname.lower() or pname.endswith(("ln_1.weight", "ln_2.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def config_dict(name: str, model: nn.Module) -> dict[str, Any] | None:
    """config.json as save_pretrained writes it (architectures included); nanoGPT's is built from model_args."""
    if name == "nanogpt":
        args = model.model_args()
        return transformers.GPT2Config(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                                       n_positions=args["block_size"], vocab_size=args["vocab_size"]).to_dict()
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    return cfg


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def attentions(name: str, model: nn.Module, ids: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Attention probabilities of every layer, [heads, T, T] for the one sequence in ``ids``."""
    with torch.no_grad():
        if name == "nanogpt":
            return [a[0] for a in model.attentions(ids)]
        return [a[0] for a in model(input_ids=ids, output_attentions=True, **kw).attentions]


def family_of_expected(name: str) -> str:
    """The family ckptaudit should report for a test model (the fixture model is a GPT-2)."""
    return "gpt2" if name == "fixture" else name.split("_m")[0] if name.startswith("falcon_") else name
