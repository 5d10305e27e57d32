"""Train the small GPT-2 language model of the paper 001 / 004 reproductions with transformers.Trainer.

Text: English documentation that ships with Python and with two of ckptaudit's own dependencies, so the runs
rebuild offline: Python's ``pydoc_data.topics`` and the docstrings (read from the source with ``ast``, nothing is
imported or run) of the standard library, numpy and scipy, each distinct docstring once, about 8 MB; a 0.75 MB
corpus (pydoc alone) was memorised within 10 epochs by this model. A byte-level BPE tokenizer (4,096 tokens) is trained on the training part and
saved in every checkpoint. Every tenth document is the validation split (``val.txt``, also the ``--data`` file
of the ckptaudit commands); training reads the rest (``train.txt``) in fixed windows.

    python docs/reproductions/train_lm.py OUT [--optimizer adamw|sgd] [--seed 42] [--steps 3000]
        [--save-every 60] [--layers 4] [--d-model 256] [--heads 8] [--threads 1] [--resume]

Writes OUT/checkpoint-N/ every --save-every steps (checkpoint-0 is the initialisation), each with model,
optimizer, scheduler, RNG and trainer state and the tokenizer; OUT/train.txt and OUT/val.txt; OUT/DONE at the end
(a finished run is not retrained). --resume continues an interrupted run from its newest checkpoint (the
Trainer's resume_from_checkpoint: weights, optimizer, scheduler, RNG and data position), with the tokenizer saved in
that checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def corpus() -> list[str]:
    """The documentation text: pydoc topics, then every distinct docstring of 80+ characters of the standard
    library (tests excluded), numpy and scipy, in sorted file order (identical for the same versions)."""
    import ast
    import importlib.util
    import pydoc_data.topics as topics
    import sysconfig

    parts = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [stdlib] + [Path(importlib.util.find_spec(m).origin).parent for m in ("numpy", "scipy")]
    seen = set(parts)
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).parts
            if any(p in ("test", "tests", "site-packages", "idlelib", "turtledemo") for p in rel):
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 80 and doc not in seen:
                        seen.add(doc)
                        parts.append(doc)
    return parts


def train_tokenizer(text: str, vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")


class Windows(torch.utils.data.Dataset):
    """Consecutive non-overlapping windows of ``seq`` tokens."""

    def __init__(self, ids: list[int], seq: int):
        n = len(ids) // seq
        self.data = torch.tensor(ids[: n * seq]).view(n, seq)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--save-every", type=int, default=60)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in OUT")
    args = ap.parse_args()
    if (args.out / "DONE").exists():
        print(f"{args.out}: already trained")
        return
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    docs = corpus()
    train_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    val_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text(train_text, encoding="utf-8")
    (args.out / "val.txt").write_text(val_text, encoding="utf-8")
    resume = None
    if args.resume:
        done = [c for c in args.out.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
        if not done:
            raise SystemExit(f"{args.out}: no checkpoint with a trainer_state.json to resume from")
        resume = max(done, key=lambda c: int(c.name.split("-")[1]))
    if resume is not None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(resume)
    else:
        tok = train_tokenizer(train_text, args.vocab)
    train = Windows(tok(train_text)["input_ids"], args.seq)
    val = torch.utils.data.Subset(Windows(tok(val_text)["input_ids"], args.seq), range(64))  # the periodic eval_loss
    transformers.set_seed(args.seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=args.seq, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # Paper 001, Table 1 (AdamW betas 0.9/0.95, weight decay 0.5, lr 1e-3, cosine decay after a 15% warm-up,
    # gradient clipping 1.0) and Table 8 run C for SGD (momentum 0.9, lr 1e-2, weight decay 0.05).
    adamw = args.optimizer == "adamw"
    targs = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=32, learning_rate=1e-3 if adamw else 1e-2,
        weight_decay=0.5 if adamw else 0.05, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=int(0.15 * args.steps),
        optim="adamw_torch" if adamw else "sgd", optim_args=None if adamw else "momentum=0.9",
        save_strategy="steps", save_steps=args.save_every, save_total_limit=None,
        eval_strategy="steps", eval_steps=args.save_every, logging_steps=max(1, args.save_every // 4),
        seed=args.seed, data_seed=args.seed, report_to=[], dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True,
    )

    # checkpoint-0: the initialisation (weights, config, tokenizer), so that drift is measured from theta(0).
    if resume is None:
        model.save_pretrained(args.out / "checkpoint-0")
        tok.save_pretrained(args.out / "checkpoint-0")
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val, processing_class=tok)
    start = time.time()
    if resume is not None:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    note = f" (resumed from {resume.name})" if resume is not None else ""
    (args.out / "DONE").write_text(f"{time.time() - start:.0f} s{note}\n")
    print(f"{args.out}: {args.steps} steps in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
