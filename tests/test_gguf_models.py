"""GGUF files as runnable models: load_model / load_tokenizer on a hand-written llama.cpp-style GGUF, and
born-gap / finetune-probe on it end to end.

The GGUF is written here with gguf.GGUFWriter from a tiny random LlamaForCausalLM, with llama.cpp's tensor names,
its Q/K row permutation (which transformers undoes on load) and a byte-level BPE tokenizer in the metadata.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # noqa: E402 - core dependencies: absent is a failure, not a skip
import numpy as np
import pytest
import torch
import transformers  # noqa: E402
from cli_helpers import invoke

from ckptaudit.errors import CorruptFileError, DataError, UnknownArchitectureError
from ckptaudit.io.discover import discover_run
from ckptaudit.io.models import load_model, load_tokenizer

WORDS = ["the", "old", "man", "felt", "a", "deep", "longing", "yearning", "joy", "for", "home"]
CTX = "the old man felt a deep"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 32, 64, 2, 4, 2, 64


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """Tokens and merges of a byte-level BPE in which every word of WORDS, with and without a leading space
    ("Ġ" in the byte alphabet), is one token. Space-prefixed chains rank first so " old" never ends as "Ġ" + "old"."""
    tokens = ["<|endoftext|>", "Ġ", *sorted(set("".join(WORDS)))]
    merges: list[str] = []
    for spelled in ["Ġ" + w for w in WORDS] + WORDS:
        current = spelled[0]
        for ch in spelled[1:]:
            merge = f"{current} {ch}"
            current += ch
            if merge not in merges:
                merges.append(merge)
            if current not in tokens:
                tokens.append(current)
    return tokens, merges


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row permutation (the inverse of transformers' reverse_permute)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tokenizer: bool = True,
    tied: bool = False,
    quant: gguf.GGMLQuantizationType | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[torch.nn.Module, list[str]]:
    """Write a tiny random Llama as a llama.cpp-style GGUF; returns (the transformers model it holds, tokens).

    ``quant``: store the 2-D weights in that GGML type; the returned model then holds the dequantised weights
    (what the file really contains). ``drop``: GGUF tensor names to leave out.
    """
    tokens, merges = byte_level_vocab()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tokens),
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not tied:
        names["output.weight"] = "lm_head.weight"
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names.update(
            {
                f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
                f"blk.{i}.attn_q.weight": p + "self_attn.q_proj.weight",
                f"blk.{i}.attn_k.weight": p + "self_attn.k_proj.weight",
                f"blk.{i}.attn_v.weight": p + "self_attn.v_proj.weight",
                f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
                f"blk.{i}.ffn_norm.weight": p + "post_attention_layernorm.weight",
                f"blk.{i}.ffn_gate.weight": p + "mlp.gate_proj.weight",
                f"blk.{i}.ffn_up.weight": p + "mlp.up_proj.weight",
                f"blk.{i}.ffn_down.weight": p + "mlp.down_proj.weight",
            }
        )

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    loaded = {}
    for gguf_name, hf_name in names.items():
        data = sd[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, HEADS, HEADS)
        elif gguf_name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, HEADS, KV_HEADS)
        if gguf_name in drop:
            continue
        if quant is not None and data.ndim == 2:
            packed = gguf.quants.quantize(data, quant)
            w.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=quant)
            stored = gguf.quants.dequantize(packed, quant).reshape(data.shape)
            # what the loader gives back: the dequantised values, with the permutation undone
            if gguf_name.endswith("attn_q.weight") or gguf_name.endswith("attn_k.weight"):
                n = HEADS if gguf_name.endswith("attn_q.weight") else KV_HEADS
                stored = (
                    stored.reshape(n, stored.shape[0] // n // 2, 2, -1).swapaxes(2, 1).reshape(data.shape)
                )
            loaded[hf_name] = torch.from_numpy(np.ascontiguousarray(stored))
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if loaded:
        with torch.no_grad():
            targets = model.state_dict()
            for name, value in loaded.items():
                targets[name].copy_(value)
    return model, tokens


def ckpt_of(path: Path):
    run = discover_run(path)
    assert len(run) == 1, run
    return run.checkpoints[-1]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module, list[str]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, tokens = write_tiny_gguf(path)
    return path, model, tokens


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_gguf_checkpoint_loads_with_original_logits(tiny_gguf):
    path, reference, tokens = tiny_gguf
    ckpt = ckpt_of(path)
    assert ckpt.layout == "gguf"
    net = load_model(ckpt)
    assert type(net).__name__ == "LlamaForCausalLM" and not net.training
    assert next(net.parameters()).dtype == torch.float32
    assert net.config.vocab_size == len(tokens) and net.config.tie_word_embeddings is False
    ids = [2, 7, 11, 19, 5, 23, 1, 30]
    torch.testing.assert_close(_logits(net, ids), _logits(reference, ids), atol=1e-5, rtol=0)


def test_gguf_q_k_permutation_is_undone(tiny_gguf):
    path, reference, _ = tiny_gguf
    net = load_model(ckpt_of(path))
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj"):
            got = net.model.layers[i].self_attn.get_submodule(proj).weight
            want = reference.model.layers[i].self_attn.get_submodule(proj).weight
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_quantised_tied_gguf_loads_its_dequantised_weights(tmp_path):
    path = tmp_path / "tiny-q8.gguf"
    reference, _ = write_tiny_gguf(path, tied=True, quant=gguf.GGMLQuantizationType.Q8_0, seed=1)
    net = load_model(ckpt_of(path), dtype=torch.float32)
    assert net.config.tie_word_embeddings is True
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    torch.testing.assert_close(_logits(net, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_gguf_tokenizer_comes_from_the_metadata(tiny_gguf):
    path, _, tokens = tiny_gguf
    assert not (path.parent / "tokenizer.json").exists()
    tok = load_tokenizer(path)
    expected = [tokens.index(t) for t in ["the", "Ġold", "Ġman", "Ġfelt", "Ġa", "Ġdeep"]]
    assert tok(CTX)["input_ids"] == expected
    assert tok.encode(" longing", add_special_tokens=False) == [tokens.index("Ġlonging")]
    assert tok.decode(expected) == CTX
    assert tok.eos_token == "<|endoftext|>"


def test_gguf_without_tokenizer_metadata_is_a_data_error(tmp_path):
    path = tmp_path / "no-tok.gguf"
    write_tiny_gguf(path, tokenizer=False)
    with pytest.raises(DataError) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value) and "convert_hf_to_gguf" in str(err.value)


def test_directory_tokenizer_still_loads(tmp_path):
    from conftest import make_tiny_lm_dir

    d = make_tiny_lm_dir(tmp_path / "lm", {"<unk>": 0, "hello": 1, "world": 2}, unk="<unk>")
    assert load_tokenizer(d)("hello world")["input_ids"] == [1, 2]
    assert load_tokenizer(d / "model.safetensors")("world")["input_ids"] == [2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, arch="notallama")
    with pytest.raises(UnknownArchitectureError) as err:
        load_model(ckpt_of(path))
    msg = str(err.value)
    assert str(path) in msg and "'notallama'" in msg and "llama" in msg.split("supported:")[1]


def test_gguf_missing_tensor_is_reported(tmp_path):
    path = tmp_path / "holed.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CorruptFileError) as err:
        load_model(ckpt_of(path))
    assert str(path) in str(err.value) and "layers.1.mlp.up_proj.weight" in str(err.value)


def _contexts(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "contexts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_born_gap_cli_on_gguf(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    ctx = _contexts(
        tmp_path,
        [
            {"context": CTX, "target": "longing", "competitor": "yearning"},
            {"context": "the old man felt", "target": "joy"},
        ],
    )
    r = invoke("born-gap", str(path), "--contexts", str(ctx), "--json", "--no-report", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["contexts"]) == 2
    for c in doc["contexts"]:
        assert abs(c["phi"] - (c["signal"] + c["drag"])) < 1e-10
        assert 0 < c["purity"] <= 1


def test_born_gap_cli_unsupported_architecture_exits_2(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, arch="notallama")
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "joy"}])
    r = invoke("born-gap", str(path), "--contexts", str(ctx), "--no-report", "--device", "cpu")
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "notallama" in err
    assert "Traceback" not in r.output


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_probe_cli_on_gguf(tiny_gguf, tmp_path, mode):
    path, _, _ = tiny_gguf
    ctx = _contexts(tmp_path, [{"context": CTX, "target": "yearning", "competitor": "longing"}])
    r = invoke("finetune-probe", str(path), "--contexts", str(ctx), "--mode", mode, "--train-steps", "2",
               "--lr", "1e-2", "--device", "cpu", "--json", "--no-report")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    (c,) = doc["contexts"]
    assert c["mode"] == mode and len(c["phi"]) == 3
    assert c["embeddings_unchanged"] is (mode == "lora")


def test_directory_without_tokenizer_files_is_refused(tiny_checkpoint):
    """A Trainer checkpoint has config.json but no tokenizer files: transformers would build an empty tokenizer that
    encodes everything to []; ckptaudit refuses with the fix instead."""
    from ckptaudit.errors import DataError
    from ckptaudit.io.models import load_tokenizer

    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(tiny_checkpoint)


def test_llama_cpp_tensor_names_get_their_roles(tiny_gguf):
    """A GGUF's llama.cpp names (no config.json) are placed by the llama_cpp family: per-block q/k/v/o and MLP
    weights, the trunk count equal to the model's own attention and MLP matrices."""
    from ckptaudit.io.roles import resolve_architecture

    path, model, _ = tiny_gguf
    with ckpt_of(path).tensors() as src:
        shapes = {n: tuple(src.shape(n)) for n in src.keys()}
    arch = resolve_architecture(shapes, {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    assert arch.name == "llama_cpp" and "tensor names" in arch.recognised_by and not arch.missing_trunk
    roles = {p.tensor: (p.block, p.role) for p in arch.pieces}
    assert roles["blk.1.attn_k.weight"] == (1, "k") and roles["blk.0.ffn_gate.weight"] == (0, "mlp_in")
    assert roles["token_embd.weight"] == (None, "embed") and roles["output_norm.weight"] == (None, "norm")
    assert roles["output.weight"] == (None, "head")
    trunk = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)
    assert sum(p.numel for p in arch.select()) == trunk
    assert (arch.n_kv_heads, arch.kv_group) == (KV_HEADS, HEADS // KV_HEADS)


def test_a_quantisation_tag_is_never_a_step_and_full_precision_weights_are_preferred(tmp_path, tiny_gguf):
    """A model folder holding model.safetensors and a .gguf export is one checkpoint read from the safetensors
    (the GGUF is listed as left out); "Q4_1" in a GGUF's name is not step 1."""
    import shutil

    path, model, _ = tiny_gguf
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    shutil.copy(path, folder / "tiny-llama.Q4_1.gguf")
    run = discover_run(folder)
    assert [(c.layout, c.step) for c in run] == [("model-dir", 0)]
    assert run[0].weight_files == (folder / "model.safetensors",)
    assert [p for p, _ in run.left_out] == [str(folder / "tiny-llama.Q4_1.gguf")]
    alone = discover_run(folder / "tiny-llama.Q4_1.gguf")
    assert [(c.layout, c.step) for c in alone] == [("gguf", 0)]
    # A run of GGUF exports is ordered by an explicit step in the name, the tag ignored.
    runs = tmp_path / "run"
    runs.mkdir()
    for s in (100, 20):
        shutil.copy(path, runs / f"tiny-step{s}.Q8_0.gguf")
    assert discover_run(runs).steps == [20, 100]


def test_gguf_metadata_gives_the_head_counts(tiny_gguf, tmp_path):
    """The GGUF's own metadata (not a config.json that happens to sit beside it) gives per-head slicing."""
    import shutil

    from ckptaudit.io.roles import resolve_architecture

    path, model, _ = tiny_gguf
    folder = tmp_path / "beside"
    folder.mkdir()
    shutil.copy(path, folder / "tiny.gguf")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": 2}))
    ckpt = discover_run(folder / "tiny.gguf")[0]
    assert ckpt.config() == {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_size": HIDDEN,
                             "num_hidden_layers": LAYERS}
    with ckpt.tensors() as src:
        arch = resolve_architecture({n: tuple(src.shape(n)) for n in src.keys()}, ckpt.config())
    assert (arch.name, arch.n_heads, arch.n_kv_heads, arch.head_dim) == ("llama_cpp", HEADS, KV_HEADS, HIDDEN // HEADS)
    (w,) = arch.head_pieces(1, "k", 1)
    assert w.tensor == "blk.1.attn_k.weight" and w.index == ((0, 8, 16),)
