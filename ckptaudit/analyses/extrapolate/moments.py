"""What storing Adam's moments at a lower precision does to them and to the update directions the moment-based
predictors extrapolate (``extrapolate --moment-dtype``; SPEC §7, paper 004 whose code keeps m and v in float16).

For one checkpoint's optimizer state and a storage dtype, over every parameter with both moments (float64
arithmetic; r(x) = x rounded to the dtype by torch's ``Tensor.to``):

- ``entries``: number of scalars; ``m_flushed`` / ``v_flushed``: fraction of the nonzero m / v entries that round to
  zero (underflow: float16's smallest subnormal is 6e-8, so a second moment below about 3e-8 vanishes);
  ``nonfinite``: entries that round to +-inf (overflow, float16 above 65504);
- ``momentum_rel_change`` = ||u(r(m), r(v)) - u(m, v)|| / ||u(m, v)|| for the paper's update u = m / sqrt(v + eps);
- ``adam_rel_change``, the same for the AdamW update mhat / (sqrt(vhat) + eps) with the bias corrections of the
  stored step count (the adam-step predictor's direction; weight decay does not depend on the moments).

Each norm runs over all parameters together; eps is each parameter group's own.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckptaudit.analyses.extrapolate.predictors import adam_step_prediction, momentum_prediction


def _momentum_update(m: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's m / sqrt(v + eps), as the momentum predictor takes it (one step, from theta = 0)."""
    return momentum_prediction(torch.zeros_like(m), m, v, 1.0, eps)


def _adam_update(m: torch.Tensor, v: torch.Tensor, step: float | None, betas: tuple, eps: float) -> torch.Tensor:
    """mhat / (sqrt(vhat) + eps), as the adam-step predictor takes it (minus one step of lr 1 from theta = 0)."""
    return -adam_step_prediction(torch.zeros_like(m), m, v, float(step or 1.0), 1.0, 1.0, betas, eps, 0.0)


def moment_rounding(optimizer: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The rounding summary of ``optimizer`` (an OptimizerState) at ``dtype`` (module docstring)."""
    groups = {name: optimizer.groups[g] for g, names in enumerate(optimizer.names) for name in names}
    n = m_nz = v_nz = m_fl = v_fl = bad = 0
    sums = {"momentum": [0.0, 0.0], "adam": [0.0, 0.0]}  # [||change||^2, ||update||^2]
    for name, st in optimizer.state.items():
        if st.exp_avg is None or st.exp_avg_sq is None:
            continue
        hyper = groups.get(name, {})
        eps = float(hyper.get("eps", 1e-8))
        betas = tuple(hyper.get("betas", (0.9, 0.999)))
        m, v = st.exp_avg.double().cpu(), st.exp_avg_sq.double().cpu()
        mr, vr = st.exp_avg.to(dtype).double().cpu(), st.exp_avg_sq.to(dtype).double().cpu()
        n += m.numel()
        m_nz += int((m != 0).sum())
        v_nz += int((v != 0).sum())
        m_fl += int(((m != 0) & (mr == 0)).sum())
        v_fl += int(((v != 0) & (vr == 0)).sum())
        bad += int((~torch.isfinite(mr) & torch.isfinite(m)).sum() + (~torch.isfinite(vr) & torch.isfinite(v)).sum())
        for key, (u, ur) in (("momentum", (_momentum_update(m, v, eps), _momentum_update(mr, vr, eps))),
                             ("adam", (_adam_update(m, v, st.step, betas, eps), _adam_update(mr, vr, st.step, betas, eps)))):
            sums[key][0] += float((ur - u).square().sum())
            sums[key][1] += float(u.square().sum())
    return {
        "dtype": str(dtype).replace("torch.", ""), "entries": n,
        "m_flushed": m_fl / m_nz if m_nz else 0.0, "v_flushed": v_fl / v_nz if v_nz else 0.0, "nonfinite": bad,
        **{f"{k}_rel_change": (math.sqrt(a / b) if b > 0 else math.nan) for k, (a, b) in sums.items()},
    }
