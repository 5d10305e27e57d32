"""Benchmark of `classify-embeddings` (not a test; run by hand or from `make bench`).

A random Gaussian embedding matrix (default 50,000 x 768, float32, seeded) is classified twice:

- exact:   all V(V-1)/2 pairs in tiles (``--tile`` rows a side) streamed into the c-histogram; wall time and the peak
           resident memory above the baseline held before the call (sampled every 5 ms), next to the tile bound
           (about five tile x tile float32 buffers: the product, the squares, the bin indices, a mask, temporaries);
- sampled: ``--pairs`` random pairs (default 200,000); its statistics against the exact ones (target: < 0.01).

    python benchmarks/bench_embeddings.py                    # 50,000 x 768 on the CPU
    python benchmarks/bench_embeddings.py --n 5000 --d 128    # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class PeakRSS:
    """Peak resident set size of this process while the context is open, sampled by a thread (bytes)."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._every = every_s
        self.baseline = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._every)

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self._proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="vocabulary rows")
    ap.add_argument("--d", type=int, default=768, help="embedding width")
    ap.add_argument("--tile", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from ckptaudit.analyses.embeddings.run import overlap_stats

    E = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(args.seed))
    mib = 1 / 2**20
    print(f"matrix {args.n} x {args.d} float32 ({E.numel() * 4 * mib:.0f} MiB), tile {args.tile}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")

    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        ex = overlap_stats(E, exact=True, tile=args.tile, device=args.device)
        t_exact, cpu_exact = time.perf_counter() - t0, time.process_time() - c0
    with PeakRSS() as mem_s:
        t0, c0 = time.perf_counter(), time.process_time()
        sa = overlap_stats(E, pairs=args.pairs, seed=args.seed, device=args.device)
        t_sampled, cpu_sampled = time.perf_counter() - t0, time.process_time() - c0

    tile_bound = 5 * args.tile**2 * 4 + E.numel() * 4  # tile buffers + the normalised copy of E
    print()
    # CPU seconds (all threads) next to wall time: on a shared machine wall time also counts waiting for cores.
    print(f"{'mode':<8} {'pairs':>14} {'wall s':>8} {'CPU s':>8} {'peak RSS above baseline MiB':>28} {'bound MiB':>10}")
    print(f"{'exact':<8} {ex.pairs:>14,} {t_exact:>8.1f} {cpu_exact:>8.1f} {(mem.peak - mem.baseline) * mib:>28.0f} "
          f"{tile_bound * mib:>10.0f}")
    print(f"{'sampled':<8} {sa.pairs:>14,} {t_sampled:>8.1f} {cpu_sampled:>8.1f} "
          f"{(mem_s.peak - mem_s.baseline) * mib:>28.0f} {'':>10}")
    print()
    rows = [("mean_c2", ex.mean_c2, sa.mean_c2), ("std_c2", ex.std_c2, sa.std_c2),
            ("frac_abs_c_gt_0_3", ex.frac_abs_c_gt_0_3, sa.frac_abs_c_gt_0_3),
            ("frac_abs_c_gt_0_5", ex.frac_abs_c_gt_0_5, sa.frac_abs_c_gt_0_5),
            ("ks_gauss", ex.ks_gauss, sa.ks_gauss), ("ks_exp", ex.ks_exp, sa.ks_exp),
            ("bulk_index", ex.bulk_index, sa.bulk_index)]
    rows += [(f"q{q:g}_c2", a, b) for q, a, b in zip(ex.quantile_levels, ex.quantiles_c2, sa.quantiles_c2,
                                                      strict=True)]
    print(f"{'statistic':<20} {'exact':>12} {'sampled':>12} {'|diff|':>10}")
    worst = 0.0
    for name, a, b in rows:
        worst = max(worst, abs(a - b))
        print(f"{name:<20} {a:>12.6g} {b:>12.6g} {abs(a - b):>10.2e}")
    print(f"{'class':<20} {ex.bulk_class:>12} {sa.bulk_class:>12}")
    print(f"\nKS resolution of the exact histogram ({ex.bins} c-bins): {ex.ks_resolution:.2e}")
    ok = worst < 0.01 and ex.bulk_class == sa.bulk_class
    print(f"largest |sampled - exact| = {worst:.2e} ({'< 0.01: ok' if ok else 'NOT within 0.01'}); "
          f"exact wall {t_exact:.1f} s ({'< 60 s: ok' if t_exact < 60 else 'over the 60 s target'}), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
