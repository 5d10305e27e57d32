"""Parameter roles and per-head slicing (SPEC §0), checked against real (tiny, random) transformers models.

The per-head slices are verified by recomputing one head's attention probabilities (and every head's
contribution to the attention output) by hand from the sliced weights, and comparing with what the model
itself computes (eager attention, output_attentions=True, forward hooks).
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import transformers
from conftest import tiny_llama_config
from torch import nn

from ckptaudit.errors import CkptAuditError, UnknownArchitectureError
from ckptaudit.io.roles import (
    GROUPS,
    ROLES,
    TRUNK_ROLES,
    Architecture,
    Piece,
    load_role_map,
    resolve_architecture,
)

transformers.logging.set_verbosity_error()

D, N_HEADS, N_LAYERS, VOCAB, SEQ = 32, 4, 2, 40, 7


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=D, n_head=N_HEADS, n_layer=N_LAYERS, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _neox():
    cfg = transformers.GPTNeoXConfig(hidden_size=D, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
                                     vocab_size=VOCAB, intermediate_size=64, max_position_embeddings=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=N_LAYERS, vocab_size=VOCAB, intermediate_size=64,
                                   max_position_embeddings=16, attention_bias=True, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(hidden_size=D, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
                                  vocab_size=VOCAB, intermediate_size=64, max_position_embeddings=16,
                                  pad_token_id=0)
    return transformers.BertForMaskedLM(cfg)


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"gpt2": _gpt2, "gpt_neox": _neox, "llama": _llama, "bert": _bert}[kind]()
    model.config._attn_implementation = "eager"  # so that attention probabilities are returned
    with torch.no_grad():  # non-zero biases and norms, so slicing mistakes in them show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or name.endswith("ln_1.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _arch(model: nn.Module, **kw) -> Architecture:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return resolve_architecture(shapes, model.config.to_dict(), **kw)


# Where each architecture's attention reads its input and writes its output, and how it is laid out.
ATTN = {
    "gpt2": dict(inp=lambda m, b: m.transformer.h[b].attn.c_attn, out=lambda m, b: m.transformer.h[b].attn.c_proj,
                 conv1d=True, causal=True, rotary=None),
    "gpt_neox": dict(inp=lambda m, b: m.gpt_neox.layers[b].attention.query_key_value,
                     out=lambda m, b: m.gpt_neox.layers[b].attention.dense, conv1d=False, causal=True,
                     rotary=lambda m: m.gpt_neox.rotary_emb),
    "llama": dict(inp=lambda m, b: m.model.layers[b].self_attn.q_proj, out=lambda m, b: m.model.layers[b].self_attn.o_proj,
                  conv1d=False, causal=True, rotary=lambda m: m.model.rotary_emb),
    "bert": dict(inp=lambda m, b: m.bert.encoder.layer[b].attention.self.query,
                 out=lambda m, b: m.bert.encoder.layer[b].attention.output.dense, conv1d=False, causal=False,
                 rotary=None),
}


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] features (partial rotary as in GPT-NeoX), by hand."""
    r = cos.shape[-1]
    return torch.cat((x[..., :r] * cos + _rotate_half(x[..., :r]) * sin, x[..., r:]), dim=-1)


def _project(x, pieces: list[Piece], sd, conv1d: bool):
    """x [seq, d] through one head's weight piece (and bias piece) -> [seq, head_dim]."""
    w = [p for p in pieces if not p.is_bias]
    b = [p for p in pieces if p.is_bias]
    assert len(w) == 1 and len(b) <= 1
    W = w[0].take(sd[w[0].tensor])
    y = x @ W if conv1d else x @ W.T
    return y + b[0].take(sd[b[0].tensor]) if b else y


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama", "bert"])
def test_head_slices_reproduce_the_models_attention(kind):
    model, spec = _build(kind), ATTN[kind]
    arch = _arch(model)
    assert arch.name == kind and arch.n_heads == 4 and arch.head_dim == 8
    sd = model.state_dict()
    captured = {}
    hooks = []
    for layer in range(N_LAYERS):
        hooks.append(spec["inp"](model, layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: captured.__setitem__(("in", layer), args[0].detach())))
        hooks.append(spec["out"](model, layer).register_forward_hook(
            lambda mod, args, out, layer=layer: captured.__setitem__(("out", layer), out.detach())))
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    for h in hooks:
        h.remove()
    positions = torch.arange(SEQ)[None]
    dh = arch.head_dim
    for layer in range(N_LAYERS):
        x = captured[("in", layer)][0]  # [seq, d]: the attention input after its norm
        total = torch.zeros(SEQ, D)
        for head in range(arch.n_heads):
            kv = arch.kv_head(head)
            q = _project(x, arch.head_pieces(layer, "q", head), sd, spec["conv1d"])
            k = _project(x, arch.head_pieces(layer, "k", kv), sd, spec["conv1d"])
            v = _project(x, arch.head_pieces(layer, "v", kv), sd, spec["conv1d"])
            if spec["rotary"] is not None:
                cos, sin = spec["rotary"](model)(x[None], positions)
                q, k = _rope(q, cos[0], sin[0]), _rope(k, cos[0], sin[0])
            scores = q @ k.T / math.sqrt(dh)
            if spec["causal"]:
                scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
            probs = scores.softmax(-1)
            torch.testing.assert_close(probs, attentions[layer][0, head], atol=1e-5, rtol=1e-4)
            (o_piece,) = arch.head_pieces(layer, "o", head)  # the output bias belongs to no head
            w_o = o_piece.take(sd[o_piece.tensor])
            assert w_o.shape == ((dh, D) if spec["conv1d"] else (D, dh))
            total += (probs @ v) @ (w_o if spec["conv1d"] else w_o.T)
        (o_bias,) = [p for p in arch.select(["o"], blocks=[layer], include_bias=True) if p.is_bias]
        total += o_bias.take(sd[o_bias.tensor])
        torch.testing.assert_close(total, captured[("out", layer)][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama", "bert"])
def test_pieces_cover_every_element_exactly_once(kind):
    model = _build(kind)
    arch = _arch(model)
    sd = model.state_dict()
    assert sum(p.numel for p in arch.pieces) == sum(t.numel() for t in sd.values())
    assert {p.tensor for p in arch.pieces} == set(sd)
    assert all(p.role in ROLES for p in arch.pieces)
    for name, t in sd.items():
        ids = torch.arange(t.numel()).reshape(t.shape)
        taken = torch.cat([p.take(ids).reshape(-1) for p in arch.tensor_pieces(name)])
        assert torch.equal(taken.sort().values, torch.arange(t.numel())), name
    # Per-head pieces of every attention role tile their role's pieces exactly.
    for block in range(arch.n_layers):
        for role in ("q", "k", "v", "o"):
            count = arch.n_kv_heads if role in ("k", "v") else arch.n_heads
            whole = [p for p in arch.select([role], blocks=[block], include_bias=True)
                     if not (role == "o" and p.is_bias)]
            want = torch.cat([p.take(torch.arange(math.prod(p.tensor_shape)).reshape(p.tensor_shape)).reshape(-1)
                              for p in whole])
            got = torch.cat([p.take(torch.arange(math.prod(p.tensor_shape)).reshape(p.tensor_shape)).reshape(-1)
                             for h in range(count) for p in arch.head_pieces(block, role, h)])
            assert torch.equal(want.sort().values, got.sort().values), (block, role)


def test_trunk_is_attention_and_mlp_weights_only():
    model = _build("gpt2")
    arch = _arch(model)
    sd = model.state_dict()
    trunk = arch.select()
    assert {p.role for p in trunk} == set(TRUNK_ROLES) and not any(p.is_bias for p in trunk)
    names = {p.tensor for p in trunk}
    assert not any(s in n for n in names for s in ("wte", "wpe", "ln_", "lm_head"))
    expected = sum(sd[f"transformer.h.{i}.{m}.weight"].numel() for i in range(N_LAYERS)
                   for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sum(p.numel for p in trunk) == expected
    with_bias = arch.select(include_bias=True)
    assert sum(p.numel for p in with_bias) == expected + sum(
        sd[f"transformer.h.{i}.{m}.bias"].numel() for i in range(N_LAYERS)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert {p.role for p in arch.select("G")} == set(GROUPS["G"])
    assert {p.block for p in arch.select(blocks=[1])} == {1}
    roles = {n: {p.role for p in arch.tensor_pieces(n)} for n in sd}
    assert roles["transformer.wte.weight"] == {"embed"} and roles["transformer.wpe.weight"] == {"pos"}
    assert roles["transformer.ln_f.weight"] == {"norm"} and roles["lm_head.weight"] == {"head"}


def test_piece_take_is_a_view_and_put_writes_in_place():
    model = _build("gpt_neox")
    arch = _arch(model)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    t = model.state_dict()[name].clone()
    (q, k, v) = arch.tensor_pieces(name)
    assert (q.role, k.role, v.role) == ("q", "k", "v") and not q.whole
    assert q.take(t).data_ptr() >= t.data_ptr() and q.take(t)._base is not None  # a view, no copy
    (hp,) = [p for p in arch.head_pieces(0, "k", 2) if not p.is_bias]
    before = t.clone()
    hp.put(t, torch.full(hp.shape, 7.0))
    assert torch.equal(hp.take(t), torch.full(hp.shape, 7.0))
    changed = (t != before).reshape(N_HEADS, 3, 8, D)
    assert changed[2, 1].all() and changed.sum() == 8 * D  # exactly head 2's K rows
    assert pickle.loads(pickle.dumps(arch)) == arch


def test_gqa_kv_head_mapping_and_shapes():
    arch = _arch(_build("llama"))
    assert (arch.n_heads, arch.n_kv_heads, arch.kv_group) == (4, 2, 2)
    assert [arch.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    (w, b) = arch.head_pieces(1, "k", 1)
    assert w.tensor == "model.layers.1.self_attn.k_proj.weight" and w.index == ((0, 8, 16),) and b.is_bias
    with pytest.raises(CkptAuditError, match="out of range"):
        arch.head_pieces(0, "k", 2)  # only 2 kv heads
    # Without config.json the group size still follows from the q/k widths; per-head slicing does not.
    model = _build("llama")
    bare = resolve_architecture({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert bare.name == "llama" and bare.n_heads is None and bare.kv_head(3) == 1
    with pytest.raises(UnknownArchitectureError, match="number of attention heads"):
        bare.head_pieces(0, "q", 0)
    with pytest.raises(UnknownArchitectureError, match="do not hold"):
        resolve_architecture({k: tuple(v.shape) for k, v in model.state_dict().items()},
                             {"num_attention_heads": 4, "num_key_value_heads": 4})


def test_prefixes_and_legacy_names_resolve():
    sd = {k: tuple(v.shape) for k, v in _build("gpt2").state_dict().items()}
    bare = {k.removeprefix("transformer."): s for k, s in sd.items()}  # GPT2Model state dict
    for shapes in (sd, bare, {"model." + k: s for k, s in sd.items()}, {"net." + k: s for k, s in bare.items()}):
        arch = resolve_architecture(shapes, {"n_head": 4, "n_embd": D})
        assert arch.name == "gpt2" and arch.n_layers == N_LAYERS and arch.head_dim == 8
        assert sum(p.numel for p in arch.select()) == sum(p.numel for p in _arch(_build("gpt2")).select())
        assert len(arch.head_pieces(1, "q", 3)) == 2
    # Old GPT-2 checkpoints carry causal-mask buffers; old Pythia names the head embed_out.
    legacy = dict(sd, **{"transformer.h.0.attn.bias": (1, 1, 16, 16), "transformer.h.0.attn.masked_bias": ()})
    roles = {p.tensor: p.role for p in resolve_architecture(legacy).pieces}
    assert roles["transformer.h.0.attn.bias"] == roles["transformer.h.0.attn.masked_bias"] == "other"
    neox = {k.replace("lm_head", "embed_out"): tuple(v.shape) for k, v in _build("gpt_neox").state_dict().items()}
    neox["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = (2,)
    roles = {p.tensor: p.role for p in resolve_architecture(neox, {"num_attention_heads": 4}).pieces}
    assert roles["embed_out.weight"] == "head" and roles["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] == "other"
    with pytest.raises(UnknownArchitectureError, match="query_key_value"):
        resolve_architecture(neox)  # the interleaved Q/K/V cannot be split without the head count


class _OddNet(nn.Module):
    """A model no registry entry knows."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 16)
        self.stack = nn.ModuleList(nn.ModuleDict({"wq": nn.Linear(16, 16), "wk": nn.Linear(16, 16),
                                                  "wv": nn.Linear(16, 16), "wo": nn.Linear(16, 16),
                                                  "ff1": nn.Linear(16, 48), "ff2": nn.Linear(48, 16),
                                                  "scale": nn.LayerNorm(16)}) for _ in range(3))


ROLE_MAP_TOML = r"""
n_heads = 2
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.wq\.'
role = "q"
head_axis = 0
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.wk\.'
role = "k"
head_axis = 0
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.wv\.'
role = "v"
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.wo\.'
role = "o"
head_axis = 1
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.ff1\.'
role = "mlp_in"
[[roles]]
pattern = 'stack\.(?P<block>\d+)\.ff2\.'
role = "mlp_out"
[[roles]]
pattern = 'scale'
role = "norm"
[[roles]]
pattern = '^tok\.'
role = "embed"
"""


def test_role_map_toml_places_a_custom_module(tmp_path):
    torch.manual_seed(0)
    net = _OddNet()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    with pytest.raises(UnknownArchitectureError) as err:
        resolve_architecture(shapes)
    msg = str(err.value)
    assert "--role-map" in msg and "stack.0.wq.weight" in msg and "more" in msg  # 43 tensors, 10 listed
    assert "(?P<block>" in msg  # an example pattern built from the first unplaced name
    path = tmp_path / "roles.toml"
    path.write_text(ROLE_MAP_TOML)
    arch = resolve_architecture(shapes, role_map=load_role_map(path))
    assert arch.name == "custom" and arch.n_layers == 3 and (arch.n_heads, arch.head_dim) == (2, 8)
    placed = {p.tensor: (p.block, p.role) for p in arch.pieces}
    assert placed["stack.2.wk.weight"] == (2, "k") and placed["stack.1.ff2.bias"] == (1, "mlp_out")
    assert placed["tok.weight"] == (None, "embed") and placed["stack.0.scale.weight"] == (None, "norm")  # no block group
    trunk = arch.select()
    assert sum(p.numel for p in trunk) == 3 * (4 * 16 * 16 + 2 * 16 * 48)
    (w, b) = arch.head_pieces(2, "q", 1)
    sd = net.state_dict()
    assert torch.equal(w.take(sd[w.tensor]), net.stack[2]["wq"].weight[8:16])
    assert torch.equal(b.take(sd[b.tensor]), net.stack[2]["wq"].bias[8:16])
    (o,) = arch.head_pieces(0, "o", 0)
    assert torch.equal(o.take(sd[o.tensor]), net.stack[0]["wo"].weight[:, :8])
    with pytest.raises(CkptAuditError, match="head layout"):
        arch.head_pieces(0, "v", 0)  # no head_axis given for v
    # JSON works the same, and a partial map leaves the rest unplaced (named in the error).
    path_json = tmp_path / "roles.json"
    path_json.write_text(json.dumps({"roles": [{"pattern": r"stack\.(?P<block>\d+)\.w[qkvo]\.", "role": "q"}]}))
    with pytest.raises(UnknownArchitectureError, match="ff1"):
        resolve_architecture(shapes, role_map=path_json)


def test_role_map_takes_precedence_and_rejects_bad_files(tmp_path):
    model = _build("gpt2")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arch = resolve_architecture(shapes, role_map={"roles": [{"pattern": r"\.wpe\.", "role": "other"}]})
    assert arch.name == "gpt2"
    assert [p.role for p in arch.tensor_pieces("transformer.wpe.weight")] == ["other"]
    assert [p.role for p in arch.tensor_pieces("transformer.h.0.attn.c_attn.weight")] == ["q", "k", "v"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[roles]]\npattern = "x"\nrole = "attention"\n')
    with pytest.raises(CkptAuditError, match="unknown role 'attention'"):
        load_role_map(bad)
    bad.write_text("roles = [ not toml")
    with pytest.raises(CkptAuditError, match="neither valid JSON nor valid TOML"):
        load_role_map(bad)
    with pytest.raises(CkptAuditError, match="does not exist"):
        load_role_map(tmp_path / "missing.toml")


def test_plain_regex_to_role_mapping_places_the_same_pieces(tmp_path):
    """{regex: role} (SPEC 0's small map), at the top level of JSON or as a TOML [roles] table, gives the same
    placement as the list form for rules without head axes."""
    shapes = {k: tuple(v.shape) for k, v in _OddNet().state_dict().items()}
    rules = {r"stack\.(?P<block>\d+)\.wq\.": "q", r"stack\.(?P<block>\d+)\.wk\.": "k",
             r"stack\.(?P<block>\d+)\.wv\.": "v", r"stack\.(?P<block>\d+)\.wo\.": "o",
             r"stack\.(?P<block>\d+)\.ff1\.": "mlp_in", r"stack\.(?P<block>\d+)\.ff2\.": "mlp_out",
             r"\.scale\.": "norm", r"^tok\.": "embed"}
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"roles": [{"pattern": k, "role": v} for k, v in rules.items()]}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(rules))
    table = tmp_path / "table.toml"
    table.write_text("[roles]\n" + "".join(f"'{k}' = \"{v}\"\n" for k, v in rules.items()))

    def placed(path):
        return sorted((p.tensor, p.block, p.role) for p in resolve_architecture(shapes, role_map=load_role_map(path)).pieces)

    assert placed(plain) == placed(listed) == placed(table)
    assert ("stack.1.ff2.weight", 1, "mlp_out") in placed(plain)


def test_unknown_modules_inside_known_blocks_are_listed():
    """A LLaMA checkpoint with mixture-of-experts MLP weights: the registry has no role for the experts, so they are
    listed as unplaced block weights (and stay out of the trunk) instead of vanishing silently."""
    cfg = tiny_llama_config()
    shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    plain = resolve_architecture(shapes, cfg.to_dict())
    assert plain.unplaced_block_weights == ()
    experts = {f"model.layers.{b}.block_sparse_moe.experts.{e}.w1.weight": (64, 32) for b in (0, 1) for e in (0, 1)}
    arch = resolve_architecture({**shapes, **experts}, cfg.to_dict())
    assert arch.name == plain.name and sorted(arch.unplaced_block_weights) == sorted(experts)
    assert not {p.tensor for p in arch.select()} & set(experts)


def test_bert_embedding_roles():
    sd = _bert().state_dict()
    arch = resolve_architecture({k: tuple(v.shape) for k, v in sd.items()})
    role = {p.tensor: p.role for p in arch.pieces}
    assert role["bert.embeddings.word_embeddings.weight"] == "embed"
    assert role["bert.embeddings.position_embeddings.weight"] == "pos"
    assert role["bert.embeddings.token_type_embeddings.weight"] == "other"
