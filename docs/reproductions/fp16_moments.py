"""Copy a transformers.Trainer run with its Adam moments (exp_avg, exp_avg_sq of optimizer.pt) cast to float16, so
that `ckptaudit extrapolate` measures the momentum and adam-step predictors on half-precision moments and the same
weights: every other file of the copy is a symbolic link to the original.

    python docs/reproductions/fp16_moments.py RUN OUT [STEP,STEP,... | START:STOP]
"""
import sys
from pathlib import Path

import torch

src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
sel = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None


def wanted(step: int) -> bool:
    if sel is None:
        return True
    if ":" in sel:
        lo, hi = (int(x) for x in sel.split(":")[:2])
        return lo <= step <= hi
    return str(step) in sel.split(",")


dst.mkdir(parents=True, exist_ok=True)
for ck in sorted(src.glob("checkpoint-*")):
    if not wanted(int(ck.name.split("-")[1])):
        continue
    out = dst / ck.name
    out.mkdir(exist_ok=True)
    for f in ck.iterdir():
        if f.name != "optimizer.pt" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    if (ck / "optimizer.pt").is_file() and not (out / "optimizer.pt").exists():
        sd = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
        for st in sd["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(torch.float16)
        torch.save(sd, out / "optimizer.pt")
for f in ("train.txt", "val.txt"):
    if (src / f).is_file() and not (dst / f).exists():
        (dst / f).symlink_to(src / f)
