"""Optional PNG figures (matplotlib, the `plot` extra). Commands call these with their JSON summaries."""

from __future__ import annotations

from pathlib import Path

from ckptaudit.errors import UsageError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'ckptaudit[plot]'") from None
    return plt


def plot_backbone(summary: dict, out_dir: Path) -> list[Path]:
    """a(t) and ||r(t)|| per parameter set, the rho spectrum, and C(t). Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = summary["steps"]
    sets = {"trunk": summary["trunk"]}
    sets.update({f"group_{g}": r for g, r in summary.get("groups", {}).items()})
    sets.update({f"block_{b}": r for b, r in summary.get("blocks", {}).items()})
    written = []
    for name, r in sets.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, r["a"], label="a(t) backbone coordinate")
        ax.plot(steps, r["r_norm"], label="||r(t)|| transverse residual")
        ax.set_xlabel("step")
        ax.set_title(f"{name}: backbone vs residual")
        ax.legend()
        fig.tight_layout()
        p = out_dir / f"backbone_{name}_a_r.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in sets.items():
        ax.semilogy(range(1, len(r["rho"]) + 1), [max(x, 1e-16) for x in r["rho"]], marker="o", ms=3, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("rho_k")
    ax.set_title("explained variance spectrum")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "backbone_rho.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    c = summary["trunk"]["update_alignment"]
    ax.plot(steps[len(steps) - len(c):], c, marker=".")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("C(t)")
    ax.set_title("update-direction alignment with the backbone")
    fig.tight_layout()
    p = out_dir / "backbone_update_alignment.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written
