"""Benchmark: `fisher` at one checkpoint against M plain forward+backward passes of the same model and batches.

Not a test. Builds a GPT-2 on modular addition (random weights: speed does not depend on training), then times

- baseline: M x (forward, loss.backward() over every parameter) on the batches fisher uses;
- fisher:   fisher_at_model (gradients of the trunk, their storage, and one pass over their columns for the
            M x M Gram and the projections on the 6 named and K random directions; eigenpairs);

and reports the ratio (target <= 1.15) and the peak resident memory of the fisher call against M x D x 4 bytes
(the gradients themselves, float32). Peak memory is sampled by a thread reading the process RSS (psutil).

    .venv/bin/python benchmarks/bench_fisher.py            # n_embd 256, 4 blocks, M = 32
    .venv/bin/python benchmarks/bench_fisher.py --small    # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptaudit.analyses.fisher.run import FisherSettings, fisher_at_model, prepare_probes, trunk_layout  # noqa: E402
from ckptaudit.io.roles import resolve_architecture  # noqa: E402
from ckptaudit.tasks import get_task  # noqa: E402


class PeakRSS:
    """Peak resident set size (bytes) above the level at entry, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model and few batches (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is reported)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, M, B, p = (64, 2, 8, 64, 23) if args.small else (256, 4, 32, 256, 97)
    task = get_task("modadd", p=p)
    config = GPT2Config(vocab_size=task.vocab_size, n_positions=4, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=p + 1, eos_token_id=p + 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(args.device).eval()
    arch = resolve_architecture({n: tuple(t.shape) for n, t in model.state_dict().items()}, config.to_dict())
    layout = trunk_layout(arch)
    D = layout.dim
    v = torch.randn(D, dtype=torch.float64)
    dirs = {"backbone": v / v.norm()}
    for j in range(2, 7):
        w = torch.randn(D, dtype=torch.float64)
        dirs[f"pc{j}"] = w / w.norm()
    settings = FisherSettings(batches=M, n_random=10, seed=0, device=args.device)
    # run_fisher builds the probes once per run and reuses them at every checkpoint; so does this.
    probes = prepare_probes(layout, dirs, settings.n_random, settings.seed)
    batches = [task.batch("train", i, B, 0) for i in range(M)]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def baseline() -> None:
        for p_ in model.parameters():
            p_.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss, _ = task.loss_and_accuracy(model, b)
            loss.backward()
        sync()

    def fisher() -> None:
        fisher_at_model(model, task, layout, dirs, settings, batch_size=B, probes=probes)
        sync()

    baseline()  # warm-up (allocator, kernels)
    fisher()
    t_base, t_fish, peak = float("inf"), float("inf"), 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        baseline()
        t_base = min(t_base, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fisher()
            t_fish = min(t_fish, time.perf_counter() - t0)
        peak = max(peak, mem.extra)
    grads_bytes = M * D * 4
    rows = [
        ("model", f"GPT-2 n_embd={n_embd} n_layer={n_layer}, device {args.device}, threads {torch.get_num_threads()}"),
        ("trunk D", f"{D:,}"),
        ("M x batch", f"{M} x {B}"),
        ("directions", f"{len(dirs)} named + {settings.n_random} random"),
        ("baseline: M fwd+bwd (s)", f"{t_base:.3f}"),
        ("fisher (s)", f"{t_fish:.3f}"),
        ("ratio (target <= 1.15)", f"{t_fish / t_base:.3f}"),
        ("peak extra RSS (MiB)", f"{peak / 2**20:.1f}"),
        ("M x D x 4 bytes (MiB)", f"{grads_bytes / 2**20:.1f}"),
        ("peak / (M D 4)", f"{peak / grads_bytes:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"{k:<{width}}  {val}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
