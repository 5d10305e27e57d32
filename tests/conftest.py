"""Shared test fixtures.

``tiny_run`` is a real Trainer-layout run (GPT-2 on modular addition, 7 checkpoints: steps 0, 10, ..., 60)
built by fixtures/make_fixtures.py. ``make test`` builds it into fixtures/runs and sets CKPTAUDIT_FIXTURES;
otherwise it is built once into .cache/fixtures (under a file lock, so pytest-xdist workers share one build).
Treat it as read-only: copy it (``tmp_path``) before modifying anything.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "fixtures"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location(
        "make_fixtures", REPO_ROOT / "fixtures" / "make_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Nothing in the tests may reach a model hub: libraries that would look a name up (PEFT checks whether a base
# model's config exists on the hub when it saves an adapter) see offline mode.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fixture_run(name: str, adopt_threads: bool = True) -> Path:
    """Path of fixture run ``name``: $CKPTAUDIT_FIXTURES/name when complete there, else built in the cache.

    ``adopt_threads``: set this process's torch threads to the build's for good (the project's own runs, whose
    resume tests compare to 1e-6). Tests of other stacks' runs pass False and use ``build_threads`` around the one
    computation that replays training, so they leave the thread count of the session alone."""
    make_fixtures = _load_make_fixtures()
    env = os.environ.get("CKPTAUDIT_FIXTURES")
    # Absolute, because some tests run the CLI in subprocesses with another working directory.
    if env and make_fixtures.is_complete(Path(env).resolve() / name, name):
        path = Path(env).resolve() / name
    else:
        # pytest-xdist workers share the cores: one torch thread each avoids oversubscription.
        threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else None
        path = make_fixtures.ensure_run(CACHE_DIR, name, threads=threads)
    if adopt_threads:
        _adopt_build_threads(path / make_fixtures.MARKER)
    return path


def build_threads(path: Path) -> int | None:
    """The torch thread count the fixture run holding ``path`` was built with (None: torch's default)."""
    import json

    marker_name = _load_make_fixtures().MARKER
    for folder in (Path(path), *Path(path).parents):
        if (folder / marker_name).is_file():
            return json.loads((folder / marker_name).read_text(encoding="utf-8")).get("threads")
    return None


def _adopt_build_threads(marker_file: Path) -> None:
    """Use the torch thread count the run was trained with: float32 reductions split over another number of threads
    round differently, and the tests that resume training compare against the saved checkpoints to 1e-6."""
    import json

    import torch

    marker = json.loads(marker_file.read_text(encoding="utf-8"))
    if marker.get("threads"):
        torch.set_num_threads(int(marker["threads"]))


@pytest.fixture(scope="session")
def tiny_run() -> Path:
    """The ``tiny`` fixture run directory (read-only; checkpoint-0 ... checkpoint-60)."""
    return fixture_run("tiny")


@pytest.fixture(scope="session")
def trainer_lm() -> Path:
    """The ``trainer_lm`` fixture: two seeds (``seed0``, ``seed1``) of a real transformers.Trainer language-model run
    with SmolLM2's 49,152-token vocabulary; each ``seedN/run/checkpoint-{10,20,30}`` and ``seedN/data/train.jsonl``
    (the training set as the Trainer indexed it). Read-only."""
    return fixture_run("trainer_lm")


CORPUS = REPO_ROOT / "fixtures" / "data" / "corpus.txt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    """The last checkpoint of the ``tiny`` run (``checkpoint-60``), a complete Trainer checkpoint directory."""
    return tiny_run / "checkpoint-60"


def make_tiny_lm_dir(
    path: Path,
    vocab: dict[str, int],
    unk: str,
    eos: str | None = None,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    tokenizer: bool = True,
    seed: int = 0,
) -> Path:
    """A tiny random GPT-2 (16 positions, tied head) saved with save_pretrained, and beside it a WordLevel
    tokenizer over ``vocab`` (whitespace-split), saved like any local model directory. Nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    special = vocab[eos] if eos is not None else 0
    config = GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=special, eos_token_id=special)
    GPT2LMHeadModel(config).save_pretrained(path)
    if tokenizer:
        tok = Tokenizer(WordLevel(vocab, unk_token=unk))
        tok.pre_tokenizer = WhitespaceSplit()
        extra = {"eos_token": eos} if eos is not None else {}
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **extra).save_pretrained(path)
    return path


def tiny_gpt2_config(vocab: int = 64, seq: int = 16):
    """A 2-layer, 32-wide, 4-head GPT-2 config (tied head) for tests that train or load real models."""
    import transformers

    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=seq,
                                   bos_token_id=0, eos_token_id=0)


def tiny_llama_config(vocab: int = 64, seq: int = 16, tied: bool = False):
    """A 2-layer LLaMA config with grouped-query attention (4 heads, 2 kv heads) and RMSNorm; untied head by default,
    so lm_head.weight is a parameter of its own, unlike GPT-2."""
    import transformers

    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                                    tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
