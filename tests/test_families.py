"""Every architecture family, each on a tiny random model built from its transformers config (tests/families.py).

References, all independent of the family files: the model's own attention probabilities (eager attention), the
model's own forward hooks, counts from the config's arithmetic, and which weights a real LoRA step changes.
"""

from __future__ import annotations

import math

import families as F
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from ckptaudit.analyses.finetune import apply_lora, lora_targets
from ckptaudit.analyses.gxs.evaluation import final_residual_site
from ckptaudit.errors import UnknownArchitectureError
from ckptaudit.io.architectures import shipped_families
from ckptaudit.io.roles import TRUNK_ROLES, resolve_architecture

SEQ = 7
IDS = torch.randint(1, F.VOCAB - 1, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=F.FAMILIES)
def built(request):
    name = request.param
    model = F.build(name)
    arch = resolve_architecture(F.shapes_of(model), F.config_dict(name, model))
    return name, model, arch


# Families without a transformers model class, tested where their files are written.
TESTED_ELSEWHERE = {"llama_cpp": "tests/test_gguf_models.py (a llama.cpp-style GGUF)"}


def test_every_shipped_family_has_a_test_model():
    assert set(shipped_families()) == {F.family_of_expected(n) for n in F.FAMILIES} | set(TESTED_ELSEWHERE)


def test_recognised_by_config_class_then_model_type(built):
    name, model, arch = built
    assert arch.name == F.family_of_expected(name)
    assert "config.json" in arch.recognised_by
    if name != "nanogpt":  # nanoGPT has no class name of its own: its GPT-2 config names model_type gpt2
        assert "architectures" in arch.recognised_by
    config = F.config_dict(name, model)
    config.pop("architectures", None)
    by_type = resolve_architecture(F.shapes_of(model), config)
    assert by_type.name == arch.name and by_type.pieces == arch.pieces and "model_type" in by_type.recognised_by


# Falcon-7B's multi-query names are BLOOM's names, and both layouts would split its fused tensor: without
# config.json the choice is refused, naming both.
AMBIGUOUS_WITHOUT_CONFIG = {"falcon_mqa"}


def test_without_config_the_names_give_the_same_pieces(built):
    """Tensor names alone: the same pieces as with config.json, under the family's name or, when several
    families place every tensor alike, a family of the same layout (the report says which others fit)."""
    name, model, arch = built
    config = F.config_dict(name, model)
    dims = {k: config[k] for k in ("num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "hidden_size",
                                   "n_embd") if k in config and config[k] is not None}
    if name in AMBIGUOUS_WITHOUT_CONFIG:
        with pytest.raises(UnknownArchitectureError, match="place them differently: bloom, falcon"):
            resolve_architecture(F.shapes_of(model), dims)
        return
    bare = resolve_architecture(F.shapes_of(model), dims)
    assert bare.pieces == arch.pieces
    assert "tensor names" in bare.recognised_by
    assert bare.name == arch.name or arch.name in bare.recognised_by


def test_pieces_cover_every_element_exactly_once(built):
    _, model, arch = built
    sd = model.state_dict()
    assert {p.tensor for p in arch.pieces} == set(sd)
    for tname, t in sd.items():
        ids = torch.arange(t.numel()).reshape(t.shape)
        taken = torch.cat([p.take(ids).reshape(-1) for p in arch.tensor_pieces(tname)])
        assert torch.equal(taken.sort().values, torch.arange(t.numel())), tname
    for block in range(arch.n_layers):
        for role in ("q", "k", "v", "o"):
            count = arch.n_kv_heads if role in ("k", "v") else arch.n_heads
            whole = [p for p in arch.select([role], blocks=[block], include_bias=True) if not (role == "o" and p.is_bias)]
            want = torch.cat([p.take(torch.arange(math.prod(p.tensor_shape)).reshape(p.tensor_shape)).reshape(-1)
                              for p in whole])
            got = torch.cat([p.take(torch.arange(math.prod(p.tensor_shape)).reshape(p.tensor_shape)).reshape(-1)
                             for h in range(count) for p in arch.head_pieces(block, role, h)])
            assert torch.equal(want.sort().values, got.sort().values), (block, role)


def _trunk_from_config(name: str) -> int:
    """Trunk scalars from the config's arithmetic: attention d*(n*dh) + 2 d*(n_kv*dh) + (n*dh)*d per layer, and
    the block MLP its Spec names (plain 2 d ff, gated 3 d ff, experts E * 3 d ff_e plus a shared expert)."""
    base = "gpt2" if name in ("nanogpt", "fixture") else name
    c, kind = F.config_of(base), F.SPECS[base].mlp
    d = c.hidden_size
    n = c.num_attention_heads
    dh = getattr(c, "head_dim", None) or d // n
    n_kv = {"falcon": F.N_KV, "falcon_mqa": 1, "falcon_mha": n}.get(name) or getattr(c, "num_key_value_heads", None) or n
    attention = d * n * dh + 2 * d * n_kv * dh + n * dh * d
    if kind == "gated":
        mlp = 3 * d * c.intermediate_size
    elif kind == "plain4d":
        mlp = 2 * d * 4 * d
    elif kind == "plain":
        mlp = 2 * d * c.intermediate_size
    else:
        n_experts = getattr(c, "num_local_experts", None) or c.num_experts
        ff = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        mlp = n_experts * 3 * d * ff + 3 * d * (getattr(c, "shared_expert_intermediate_size", None) or 0)
    return c.num_hidden_layers * (attention + mlp)


def test_trunk_count_matches_the_config_arithmetic(built):
    name, _, arch = built
    assert sum(p.numel for p in arch.select()) == _trunk_from_config(name)
    assert not arch.missing_trunk and not arch.unplaced_block_weights
    for block in range(arch.n_layers):
        assert {p.role for p in arch.select(blocks=[block])} == set(TRUNK_ROLES)


def test_experts_are_pieces_of_their_own(built):
    name, model, arch = built
    if not arch.n_experts:
        assert F.SPECS.get(name, F.Spec("", "")).mlp != "experts"
        return
    assert arch.n_experts == F.N_EXPERTS
    sd = model.state_dict()
    for e in range(F.N_EXPERTS):
        pieces = arch.select(blocks=[1], experts=[e])
        assert {p.role for p in pieces} == {"mlp_in", "mlp_out"} and all(p.expert == e for p in pieces)
        # transformers 5 stacks the experts: [E, 2 ff, d] gate | up and [E, d, ff] down
        (down,) = [p for p in pieces if p.role == "mlp_out"]
        assert torch.equal(down.take(sd[down.tensor]), sd[down.tensor][e])
        gate_up = sorted((p for p in pieces if p.role == "mlp_in"), key=lambda p: p.index)
        assert len(gate_up) == 2 and torch.equal(torch.cat([p.take(sd[p.tensor]) for p in gate_up]),
                                                 sd[gate_up[0].tensor][e])


def test_per_expert_modules_of_transformers_4_are_placed_by_expert():
    """transformers 4 kept one module per expert (Mixtral block_sparse_moe.experts.E.w1/w2/w3)."""
    model = F.build("mixtral")
    shapes = {k: s for k, s in F.shapes_of(model).items() if ".experts." not in k}
    ff, d = F.FF, F.D
    for b in range(F.N_LAYERS):
        shapes.pop(f"model.layers.{b}.mlp.gate.weight")
        shapes[f"model.layers.{b}.block_sparse_moe.gate.weight"] = (F.N_EXPERTS, d)
        for e in range(F.N_EXPERTS):
            shapes.update({f"model.layers.{b}.block_sparse_moe.experts.{e}.w1.weight": (ff, d),
                           f"model.layers.{b}.block_sparse_moe.experts.{e}.w3.weight": (ff, d),
                           f"model.layers.{b}.block_sparse_moe.experts.{e}.w2.weight": (d, ff)})
    arch = resolve_architecture(shapes, F.config_dict("mixtral", model))
    assert arch.name == "mixtral" and arch.n_experts == F.N_EXPERTS and not arch.missing_trunk
    placed = {p.tensor: (p.block, p.role, p.expert) for p in arch.pieces}
    assert placed["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (1, "mlp_out", 3)
    assert placed["model.layers.0.block_sparse_moe.experts.2.w3.weight"] == (0, "mlp_in", 2)
    assert placed["model.layers.0.block_sparse_moe.gate.weight"][1] == "other"
    assert sum(p.numel for p in arch.select()) == _trunk_from_config("mixtral")


# ------------------------------------------------------------------------------------------------ heads


def _module(model, tensor: str):
    return model.get_submodule(tensor.rsplit(".", 1)[0])


def _project(x, pieces, sd, conv1d: bool):
    w = [p for p in pieces if not p.is_bias]
    b = [p for p in pieces if p.is_bias]
    W = w[0].take(sd[w[0].tensor]).reshape(-1, x.shape[-1]) if not conv1d else w[0].take(sd[w[0].tensor])
    y = x @ W if conv1d else x @ W.T
    return y + b[0].take(sd[b[0].tensor]).reshape(-1) if b else y


def _attention_module(model, arch, block):
    """The module that owns the block's attention (the parent of the o projection)."""
    (o,) = [p for p in arch.select(["o"], blocks=[block])]
    return model.get_submodule(o.tensor.rsplit(".", 2)[0])


def test_head_slices_reproduce_the_models_attention_by_hand(built):
    """Each head's attention probabilities recomputed from the sliced Q/K weights (positions all 0, so that rotary
    embeddings are the identity), against the model's own (eager) probabilities."""
    name, model, arch = built
    sd = model.state_dict()
    captured = {}
    hooks = []
    for block in range(arch.n_layers):
        (q0,) = [p for p in arch.head_pieces(block, "q", 0) if not p.is_bias]
        hooks.append(_module(model, q0.tensor).register_forward_pre_hook(
            lambda mod, args, block=block: captured.__setitem__(block, args[0].detach()[0])))
    kw = {} if name in ("nanogpt", "bloom") else {"position_ids": torch.zeros_like(IDS)}
    probs = F.attentions(name, model, IDS, **kw)
    for h in hooks:
        h.remove()
    for block in range(arch.n_layers):
        x = captured[block]
        attn = _attention_module(model, arch, block)
        dh = arch.head_dim
        for head in range(arch.n_heads):
            (wq,) = [p for p in arch.head_pieces(block, "q", head) if not p.is_bias]
            conv1d = isinstance(_module(model, wq.tensor), Conv1D)
            q = _project(x, arch.head_pieces(block, "q", head), sd, conv1d)
            k = _project(x, arch.head_pieces(block, "k", arch.kv_head(head)), sd, conv1d)
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            if q_norm is not None and getattr(q_norm, "weight", torch.empty(dh)).shape[-1] == dh:
                q, k = q_norm(q), k_norm(k)  # per-head norms (Qwen3, Gemma 3)
            elif q_norm is not None:
                continue  # OLMo 2 normalises all heads together: covered by the perturbation test
            scale = getattr(attn, "scaling", None) or getattr(attn, "inv_norm_factor", None)
            scores = q @ k.T * (scale if scale is not None else dh ** -0.5)
            cap = getattr(model.config, "attn_logit_softcapping", None) if name != "nanogpt" else None
            if cap:
                scores = torch.tanh(scores / cap) * cap
            if name == "bloom":
                from transformers.models.bloom.modeling_bloom import build_alibi_tensor

                alibi = build_alibi_tensor(torch.ones(1, SEQ), arch.n_heads, torch.float32)
                scores = scores + alibi[head, 0][None, :]
            if F.SPECS.get(name, F.Spec("", "")).causal:
                scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(scores.softmax(-1), probs[block][head], atol=1e-5, rtol=1e-4)


def _perturbed(model, pieces, seed):
    """A copy of ``model`` with noise added to exactly the elements of ``pieces``."""
    import copy

    clone = copy.deepcopy(model)
    sd = clone.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pieces:
            view = p.take(sd[p.tensor])
            view.add_(torch.randn(view.shape, generator=g))
    return clone


def _neutral_norms(model):
    """OLMo 2's q_norm / k_norm span all heads, so that one head's weights move every head's scores: replace
    them by identities for the perturbation test (they are not under test)."""
    for mod in model.modules():
        for attr in ("q_norm", "k_norm"):
            norm = getattr(mod, attr, None)
            if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() > F.D // F.N_HEADS:
                setattr(mod, attr, torch.nn.Identity())


def test_perturbing_one_heads_slices_moves_exactly_that_head(built):
    """Noise on the Q slices of head h changes head h's attention and no other head's; noise on the K slices of
    kv head j changes exactly the query heads that read it; noise on the V slices of kv head j changes exactly
    the input features of the output projection that the O slices of those query heads read."""
    name, model, arch = built
    import copy

    model = copy.deepcopy(model)
    _neutral_norms(model)
    base = F.attentions(name, model, IDS)
    block = arch.n_layers - 1  # the last block: earlier blocks must not move

    def moved(after):
        assert all(torch.equal(a, b) for a, b in zip(base[:block], after[:block]))
        return {h for h in range(arch.n_heads) if (after[block][h] - base[block][h]).abs().max() > 1e-6}

    for head in (0, arch.n_heads - 1):
        assert moved(F.attentions(name, _perturbed(model, arch.head_pieces(block, "q", head), head), IDS)) == {head}
    for kv in range(arch.n_kv_heads):
        readers = {h for h in range(arch.n_heads) if arch.kv_head(h) == kv}
        assert moved(F.attentions(name, _perturbed(model, arch.head_pieces(block, "k", kv), kv), IDS)) == readers

    (o_weight,) = [p for p in arch.select(["o"], blocks=[block])]
    o_module = _module(model, o_weight.tensor)
    conv1d = isinstance(o_module, Conv1D)

    def o_inputs(m):
        seen = {}
        hook = _module(m, o_weight.tensor).register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
        F.attentions(name, m, IDS)
        hook.remove()
        return seen["x"][0]

    x0 = o_inputs(model)
    shape = o_weight.tensor_shape
    for kv in range(arch.n_kv_heads):
        x1 = o_inputs(_perturbed(model, arch.head_pieces(block, "v", kv), 10 + kv))
        changed = set(torch.nonzero((x1 - x0).abs().max(0).values > 1e-7).flatten().tolist())
        expected = set()
        for h in (h for h in range(arch.n_heads) if arch.kv_head(h) == kv):
            (op,) = arch.head_pieces(block, "o", h)
            flat = op.take(torch.arange(math.prod(shape)).reshape(shape)).reshape(-1)
            in_index = flat // shape[1] if conv1d else flat % shape[1]
            expected |= set(in_index.tolist())
        assert changed == expected, kv


# ------------------------------------------------------------------------------------------------ LoRA, norm


def test_lora_targets_adapt_query_and_value_of_every_block(built):
    """One real LoRA step (peft) on the family's targets: after merging, the changed weights are exactly the
    target projections, and the Q and V pieces of every block moved."""
    name, model, arch = built
    import copy

    targets, note = lora_targets(model)
    assert targets == arch.family.lora_targets
    fused = any(p.role == "q" and not p.whole for p in arch.select(["q"]))
    assert (note is not None) == fused  # a fused Q|K|V target is said in the report
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(copy.deepcopy(model), targets)
    for n, p in peft_model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))  # one "step": both factors non-zero so that B A != 0
    merged = peft_model.merge_and_unload().state_dict()
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    expected = {p.tensor for p in arch.pieces if p.tensor.rsplit(".", 2)[-2] in targets and not p.is_bias}
    assert changed == expected
    for block in range(arch.n_layers):
        for role in ("q", "v"):
            assert any(not torch.equal(p.take(before[p.tensor]), p.take(merged[p.tensor]))
                       for p in arch.select([role], blocks=[block]))


def test_slack_probe_hooks_the_norm_that_feeds_the_lm_head(built):
    name, model, arch = built
    site, module, kind = final_residual_site(model)
    assert kind == "output" and site in arch.family.final_norm
    head = model.lm_head if name == "nanogpt" else model.get_output_embeddings()
    seen = {}
    h1 = module.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out))
    h2 = head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    F.attentions(name, model, IDS)
    h1.remove()
    h2.remove()
    assert torch.equal(seen["norm"], seen["head"])


# ------------------------------------------------------------------------------------------------ schema, CLI


@pytest.mark.parametrize("doc, key, match", [
    ({"name": "x", "roles": [{"pattern": "a", "role": "q"}], "colour": 1}, "colour", "unknown key"),
    ({"name": "X", "roles": [{"pattern": "a", "role": "q"}]}, "name", "lower-case"),
    ({"name": "x", "roles": [{"pattern": "a", "fused": "quarters"}]}, r"roles\[0\].fused", "unknown layout"),
    ({"name": "x", "roles": [{"pattern": "a(", "role": "q"}]}, r"roles\[0\].pattern", "not a valid regex"),
    ({"name": "x", "roles": [{"pattern": "a", "role": "q", "fused": "thirds"}]}, r"roles\[0\].role", "parts"),
    ({"name": "x", "roles": [{"pattern": "a", "fused": "halves", "parts": ["mlp_in"]}]}, r"roles\[0\].parts", "2 parts"),
    ({"name": "x", "extends": "nope", "roles": []}, "extends", "no family named 'nope'"),
    ({"name": "x", "orientation": "auto", "roles": [{"pattern": "a", "role": "q"}]}, "orientation", "probe"),
    ({"name": "x", "config": {"heads": ["n"]}, "roles": [{"pattern": "a", "role": "q"}]}, "config.heads", "unknown"),
    ({"name": "x", "roles": [{"pattern": "a", "role": "q", "experts": -1}]}, r"roles\[0\].experts", "at least 0"),
    ({"name": "x", "roles": []}, "roles", "at least one rule"),
])
def test_a_broken_family_file_is_an_error_naming_the_key(doc, key, match):
    from ckptaudit.errors import UsageError
    from ckptaudit.io.architectures import family_from_dict

    with pytest.raises(UsageError, match=rf"fam\.toml: {key}: .*{match}"):
        family_from_dict(doc, "fam.toml", shipped_families())


def test_a_user_family_overrides_or_extends_a_shipped_one(tmp_path):
    """A --role-map file with a shipped name replaces that family; with extends it inherits and goes first."""
    model = F.build("starcoder2")
    shapes, config = F.shapes_of(model), F.config_dict("starcoder2", model)
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mycoder"\nextends = "starcoder2"\n[[roles]]\npattern = \'\\bembed_tokens{param}\'\n'
                    'role = "other"\n')
    arch = resolve_architecture(shapes, config, role_map=mine)
    assert arch.name == "mycoder" and "role map" in arch.recognised_by
    roles = {p.tensor: p.role for p in arch.pieces}
    assert roles["model.embed_tokens.weight"] == "other" and roles["model.layers.0.mlp.c_fc.weight"] == "mlp_in"
    # a user file named like a shipped family (here: without its MLP rules) is used in its place
    bare = tmp_path / "bare.toml"
    bare.write_text('name = "starcoder2"\nextends = "llama"\n')
    with pytest.raises(UnknownArchitectureError, match="trunk is incomplete"):
        resolve_architecture(shapes, config, role_map=bare, allow_partial_trunk=False)


def test_architectures_command_lists_every_file_and_one_familys_rules(tmp_path):
    import json

    from cli_helpers import assert_one_line_error, invoke

    listing = json.loads(invoke("architectures", "--json").stdout)
    assert {r["name"] for r in listing["families"]} == set(shipped_families())
    phi3 = next(r for r in listing["families"] if r["name"] == "phi3")
    assert phi3["fused"] == ["by_head_counts", "halves"] and phi3["model_types"] == ["phi3"]
    assert phi3["file"].endswith("architectures/phi3.toml")
    rules = json.loads(invoke("architectures", "mixtral", "--json").stdout)["rules"]
    assert rules[0]["fused"] == "halves" and rules[0]["experts"] == 0
    assert_one_line_error(invoke("architectures", "nosuch"), "nosuch", "known:")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[roles]]\npattern = "a"\nrole = "attention"\n')
    assert_one_line_error(invoke("architectures", "--role-map", bad), "bad.toml", "roles[0].role")
    good = tmp_path / "good.toml"
    good.write_text('name = "mine"\nextends = "llama"\n')
    names = [r["name"] for r in json.loads(invoke("architectures", "--role-map", good, "--json").stdout)["families"]]
    assert "mine" in names and len(names) == len(shipped_families()) + 1
