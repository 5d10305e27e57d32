"""Side-by-side benchmark of `backbone` (not a test; `make bench` runs it).

A synthetic run of 51 checkpoints with a ~25M-parameter GPT-2 trunk (d = 512, 8 blocks, fp32, Trainer layout) is
generated once into the cache directory. Each method then runs in its own subprocess so that its peak resident
memory (ru_maxrss) is its own:

- read:      read every tensor byte of every checkpoint once (the floor for any exact method), run twice: the
             first run warms the page cache, the second is the reported warm-cache figure;
- ckptaudit: ``run_backbone`` (Grams of trunk, every block and the G/S groups in one pass + all metrics);
- naive:     stack the trunk drift matrix X (float32, T x D) in memory, then ``np.linalg.svd(X)`` as the paper's
             public code does; skipped when X plus SVD workspace would not fit in memory;
- ckptaudit x N (``--nproc N``): the same ``run_backbone`` under ``torch.distributed.run --standalone
             --nproc-per-node N`` (gloo on CPU): time of rank 0 (process-group start included) and the speed-up
             against one process; peak RSS is the largest of the ranks.

The table and a machine description are appended to benchmarks/RESULTS.md.

    python benchmarks/bench_backbone.py            # full size (about 5 GB of checkpoints)
    python benchmarks/bench_backbone.py --small    # 11 checkpoints, d = 128, for a quick check
    python benchmarks/bench_backbone.py --nproc 2  # also run 2 processes (torch.distributed, gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FULL = {"n": 51, "d": 512, "layers": 8}
SMALL = {"n": 11, "d": 128, "layers": 4}


def shapes(d: int, layers: int, vocab: int = 256, n_pos: int = 64) -> dict[str, tuple[int, ...]]:
    s = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (n_pos, d)}
    for layer in range(layers):
        p = f"transformer.h.{layer}."
        s.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                  p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                  p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
                  p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})
    s["transformer.ln_f.weight"] = (d,)
    s["transformer.ln_f.bias"] = (d,)
    return s


def generate(root: Path, n: int, d: int, layers: int) -> Path:
    """checkpoint-<step>/model.safetensors + config.json; a drift direction plus a random walk (seeded)."""
    import torch
    from safetensors.torch import save_file

    run = root / f"run_n{n}_d{d}_l{layers}"
    done = run / ".complete"
    if done.exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sh = shapes(d, layers)
    theta = {k: 0.02 * torch.randn(s, generator=g) for k, s in sh.items()}
    drift = {k: torch.randn(s, generator=g) for k, s in sh.items()}
    cfg = {"model_type": "gpt2", "n_embd": d, "n_layer": layers, "n_head": 8, "vocab_size": 256, "n_positions": 64}
    for i in range(n):
        if i:
            for k, s in sh.items():
                theta[k] += 1e-3 * drift[k] + 1e-3 * torch.randn(s, generator=g)
        c = run / f"checkpoint-{100 * i}"
        c.mkdir(exist_ok=True)
        save_file(theta, str(c / "model.safetensors"))
        (c / "config.json").write_text(json.dumps(cfg))
    done.write_text("ok")
    return run


def method_read(run: Path) -> dict:
    import torch

    from ckptaudit.io.discover import discover_run

    nbytes = 0
    for c in discover_run(run).checkpoints:
        with c.tensors() as src:
            for name in src.keys():
                t = src.get(name)
                if not getattr(src, "ranged_reads", False):  # memory-mapped formats: touch every byte
                    t.numpy().copy() if t.dtype != torch.bfloat16 else t.clone()
                nbytes += t.numel() * t.element_size()
    return {"bytes": nbytes}


def method_ckptaudit(run: Path) -> dict:
    from ckptaudit.analyses import distributed
    from ckptaudit.analyses.backbone.run import run_backbone
    from ckptaudit.io.discover import discover_run

    device = os.environ.get("CKPTAUDIT_BENCH_DEVICE") or ("cuda" if _cuda() else "cpu")
    ctx = distributed.init_from_env(device)  # None unless launched by torchrun with several processes
    try:
        r = discover_run(run)
        t = time.perf_counter()
        rep = run_backbone(r, device=ctx.device if ctx else device)
        seconds_pass = time.perf_counter() - t
    finally:
        if ctx is not None:
            ctx.close()
    T = len(r.checkpoints) - 1
    return {"rho1": float(rep.trunk.rho[0]), "k95": rep.trunk.k95, "D": rep.dims["trunk"],
            "sigma1": float(rep.trunk.sigma[0]), "T": T, "seconds_backbone": seconds_pass,
            "rank": ctx.rank if ctx else 0, "world": ctx.world_size if ctx else 1,
            "syrk_gflop": T * (T + 1) * rep.dims["trunk"] / 1e9}


def method_naive(run: Path) -> dict:
    import numpy as np

    from ckptaudit.analyses.backbone.run import backbone_groups
    from ckptaudit.io.discover import discover_run
    from ckptaudit.io.roles import resolve_architecture

    r = discover_run(run)
    with r.checkpoints[0].tensors() as src:
        arch = resolve_architecture({k: src.shape(k) for k in src.keys()}, r.checkpoints[0].config())
    pieces = backbone_groups(arch)["trunk"]
    D = sum(p.numel for p in pieces)

    def vec(c):
        out = np.empty(D, dtype=np.float32)
        o = 0
        with c.tensors() as src:
            for p in pieces:
                v = p.take(src.get(p.tensor)).reshape(-1).numpy()
                out[o : o + v.size] = v
                o += v.size
        return out

    base = vec(r.checkpoints[0])
    X = np.stack([vec(c) - base for c in r.checkpoints[1:]])
    s = np.linalg.svd(X, full_matrices=False, compute_uv=True)[1]
    rho = s**2 / np.sum(s**2)
    return {"rho1": float(rho[0]), "D": D, "sigma1": float(s[0])}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child(method: str, run: Path) -> None:
    import numpy  # noqa: F401  (imports are not part of any method's time)
    import torch  # noqa: F401

    import ckptaudit.analyses.backbone.run  # noqa: F401
    import ckptaudit.io.discover  # noqa: F401
    import ckptaudit.io.roles  # noqa: F401

    t = time.perf_counter()
    out = {"read": method_read, "ckptaudit": method_ckptaudit, "naive": method_naive}[method](run)
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(out))


def spawn(method: str, run: Path, nproc: int = 1, device: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if device is not None:
        env["CKPTAUDIT_BENCH_DEVICE"] = device
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
               "--child", method, "--bench-run", str(run)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    else:
        p = subprocess.run([sys.executable, __file__, "--child", method, "--bench-run", str(run)], capture_output=True,
                           text=True, env=env)
    results = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]}
    out = min(results, key=lambda r: r.get("rank", 0))  # rank 0's figures ...
    out["seconds"] = max(r["seconds"] for r in results)  # ... but the slowest rank's time and the largest RSS
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return out


def evict(run: Path) -> None:
    """Drop the run's files from the page cache (posix_fadvise DONTNEED on clean pages needs no privileges), so the
    next read comes from the disk: the figure "as fast as the disk" is about."""
    for f in run.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def machine() -> str:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, GPU: {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="11 checkpoints, d = 128 (quick)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench", help="where the synthetic run is kept")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--nproc", type=int, default=1, help="also run ckptaudit with this many processes (torchrun, gloo)")
    ap.add_argument("--cold", action="store_true",
                    help="also time the read and ckptaudit from a cold page cache (files evicted before each)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bench-run", dest="run", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.run)
        return
    import psutil

    size = SMALL if a.small else FULL
    t = time.perf_counter()
    run = generate(a.cache, **size)
    print(f"run: {run} (generated/checked in {time.perf_counter() - t:.1f} s)", flush=True)
    n, d, layers = size["n"], size["d"], size["layers"]
    D = 12 * d * d * layers
    x_gb = (n - 1) * D * 4 / 1e9
    cold = spawn("read", run)  # warms the page cache (not a cold-cache figure unless the cache was empty)
    read = spawn("read", run)
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours = spawn("ckptaudit", run, device=dev)
    ours_cpu = spawn("ckptaudit", run, device="cpu") if dev == "cuda" else None  # the CPU path beside the GPU's
    # nccl takes one GPU per rank: with fewer GPUs than ranks the ranks compute on the CPU (gloo)
    multi_dev = "cuda" if dev == "cuda" and torch.cuda.device_count() >= a.nproc else "cpu"
    multi = spawn("ckptaudit", run, a.nproc, device=multi_dev) if a.nproc > 1 else None
    cold_read = cold_ours = None
    if a.cold:
        evict(run)
        cold_read = spawn("read", run)
        evict(run)
        cold_ours = spawn("ckptaudit", run, device=dev)
    naive_need = 3 * x_gb * 1e9  # X + V^T + workspace
    if a.skip_naive:
        naive = {"error": ["skipped (--skip-naive)"]}
    elif naive_need > 0.8 * psutil.virtual_memory().available:
        naive = {"error": [f"skipped: needs ~{naive_need / 1e9:.1f} GB"]}
    else:
        naive = spawn("naive", run)

    def cell(r, key, f):
        return f.format(r[key]) if key in r else "—"

    rows = [
        ("read every byte once (1st run)", cold), ("read every byte once (warm cache)", read),
        (f"ckptaudit backbone ({dev})", ours), ("naive: stack X, np.linalg.svd", naive),
    ]
    if ours_cpu is not None:
        rows.insert(3, ("ckptaudit backbone (cpu)", ours_cpu))
    if multi is not None:
        one = ours if multi_dev == dev else ours_cpu
        if "seconds" in multi and "seconds" in one:
            multi.setdefault("note", f"speed-up vs 1 process: {one['seconds'] / multi['seconds']:.2f}x")
        backend = "nccl" if multi_dev == "cuda" else "gloo"
        rows.insert(len(rows) - 1, (f"ckptaudit backbone, {a.nproc} processes ({multi_dev}, torchrun, {backend})", multi))
    if cold_read is not None:
        if "seconds" in cold_read and "seconds" in cold_ours:
            cold_ours.setdefault("note", f"x cold read time: {cold_ours['seconds'] / cold_read['seconds']:.2f}")
        rows += [("read every byte once (cold cache: files evicted)", cold_read),
                 (f"ckptaudit backbone ({dev}, cold cache: files evicted)", cold_ours)]
    base = read.get("seconds")
    lines = [
        f"### backbone, {n} checkpoints, trunk D = {D / 1e6:.1f}M (fp32, GPT-2 names), {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {machine()}",
        f"Run size on disk: {read.get('bytes', 0) / 1e9:.2f} GB; stacked drift matrix X: {x_gb:.2f} GB as float32, "
        f"{2 * x_gb:.2f} GB as float64.",
        "",
        "| method | time (s) | x read time | peak RSS (MB) | note |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows:
        ratio = f"{r['seconds'] / base:.2f}" if base and "seconds" in r else "—"
        note = "; ".join(r.get("error", [])) or (f"rho1 = {r['rho1']:.6f}" if "rho1" in r else "")
        if r.get("note"):
            note += f"; {r['note']}"
        lines.append(f"| {name} | {cell(r, 'seconds', '{:.2f}')} | {ratio} | {cell(r, 'peak_rss_mb', '{:.0f}')} | {note} |")
    if "seconds" in ours and "syrk_gflop" in ours and "bytes" in read:
        gf, sec = ours["syrk_gflop"], ours["seconds"]
        lines += ["", f"Gram pass: T = {ours['T']}, D = {ours['D']:,}; symmetric rank-k products T(T+1)D = {gf:.1f} GFLOP "
                  f"(float64) in {ours['seconds_backbone']:.2f} s of the {sec:.2f} s -> {gf / ours['seconds_backbone']:.1f} "
                  f"GFLOP/s including reads; read reference {read['bytes'] / 1e9:.2f} GB in {read['seconds']:.2f} s = "
                  f"{read['bytes'] / 1e9 / read['seconds']:.2f} GB/s."]
    if cold_read is None:
        lines += ["", "Warm page cache: 'x read time' compares against memory bandwidth, not disk bandwidth (--cold adds",
                  "runs with the files evicted from the page cache first).", ""]
    else:
        lines += ["", "'x read time' is against the warm-cache read; the cold rows evict the run's files from the page cache",
                  "(posix_fadvise DONTNEED) first, so they read from the disk; their note gives the cold-to-cold ratio.", ""]
    text = "\n".join(lines)
    print(text)
    with open(a.results, "a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
