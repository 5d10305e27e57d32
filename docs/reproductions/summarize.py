"""The numbers docs/reproductions.md quotes, read from the ``--json`` output of the reproduce_00N.sh commands.

    python docs/reproductions/summarize.py PAPER RESULTS_DIR OUT_DIR

Writes OUT_DIR/summary.json (every quoted number, grouped by table, each table naming the JSON files it was read
from) and OUT_DIR/summary.md (the same as markdown tables). Nothing here measures anything: every value is a
field of a ckptaudit JSON, except the few marked ``derived`` in their table's note, whose formula the note gives.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def r(x, digits: int = 4):
    """Round for the tables; None stays None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None if x is None else str(x)
    return round(x, digits) if isinstance(x, float) else x


def table(title: str, sources: list[str], columns: list[str], rows: list[list], note: str = "") -> dict:
    return {"title": title, "sources": sources, "columns": columns, "rows": rows, "note": note}


def markdown(tables: list[dict]) -> str:
    out = []
    for t in tables:
        out.append(f"### {t['title']}\n\nfrom: {', '.join(t['sources'])}\n")
        out.append("| " + " | ".join(t["columns"]) + " |")
        out.append("|" + " --- |" * len(t["columns"]))
        for row in t["rows"]:
            out.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
        if t["note"]:
            out.append(f"\n{t['note']}")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ paper 001


def _groups(doc: dict, normalized: bool) -> list[tuple[str, dict]]:
    root = doc["normalized"] if normalized else doc
    return [("trunk", root["trunk"])] + [(f"block {k}", v) for k, v in sorted(root["blocks"].items())]


def _top10(res: dict) -> float:
    """PC1 share of the top 10 singular values only: what the paper's public code prints (derived)."""
    s = res["sigma"][:10]
    return s[0] ** 2 / sum(x * x for x in s)


def _pc1_rows(doc: dict, label: str) -> list[list]:
    rows = []
    for normalized in (False, True):
        for name, res in _groups(doc, normalized):
            rows.append([label, name, "row-normalised" if normalized else "raw", r(100 * res["rho"][0], 2),
                         r(100 * _top10(res), 2), r(100 * (_top10(res) - res["rho"][0]), 2), res["k95"], res["k99"],
                         r(res["f_b"][-1], 3), r(res["window_alignment_mean"], 4)])
    return rows


def paper_001(results: Path) -> list[dict]:
    tables = []
    runs = ["adamw", *sorted(p.stem[len("backbone-"):] for p in results.glob("backbone-adamw-to*.json")), "sgd"]
    bb = {run: load(results, f"backbone-{run}") for run in runs}
    cols = ["run", "group", "rows", "PC1 % (tool, full trace)", "PC1 % (top 10 only, derived)", "difference (points)",
            "k95", "k99", "f_b(last)", "mean c(w), W = 10"]
    rows = []
    for run, doc in bb.items():
        if doc is not None:
            rows += _pc1_rows(doc, run)
    if rows:
        tables.append(table("Trajectory PCA of all checkpoints (anchor: checkpoint-0)",
                            [f"backbone-{k}.json" for k, v in bb.items() if v], cols, rows,
                            "PC1 (top 10 only) = sigma_1^2 / (sigma_1^2 + ... + sigma_10^2) from the tool's `sigma`: the "
                            "denominator of the paper's public code; the tool divides by trace(G), every singular value."))
    for run, doc in bb.items():
        if doc is None:
            continue
        steps = doc["steps"]
        arows = []
        for name, res in _groups(doc, False):
            c = res["update_alignment"]
            early = c[: max(3, math.ceil(len(c) / 10))]
            peak = max(range(len(c)), key=lambda i: abs(c[i]))
            arows.append([name, r(statistics.fmean(early), 3), r(c[peak], 3), steps[peak], r(c[-1], 3),
                          res["sign_flip_step"], r(res["window_rotation_mean"], 4), r(res["window_rotation_max_deg"], 2),
                          r(res["a"][-1], 2), r(res["r_norm"][-1], 2), r(max(res["r_norm"]), 2),
                          steps[max(range(len(steps)), key=lambda i: res["r_norm"][i])]])
        tables.append(table(f"Update alignment and stability, {run} (raw rows)", [f"backbone-{run}.json"],
                            ["group", "mean C(t), first updates", "peak C(t)", "at step", "last C(t)", "sign flip t*",
                             "mean rotation of window PC1", "max rotation (deg)", "a(last)", "||r(last)||", "max ||r||",
                             "at step"], arows,
                            "C(t) = <x(t) - x(t-1), v_b> / ||x(t) - x(t-1)|| between consecutive checkpoints (60 steps); "
                            "'first updates' = the first max(3, ceil(T/10)) of them, the tool's own early window; v_b is "
                            "signed so that a(last) > 0."))
    # the analysis window of Table 9 (window-RUN) and the matched-loss windows of Table 10 (matched-RUN-START-STOP)
    names = [f"window-{run}" for run in ("adamw", "sgd")]
    names += sorted((p.stem for p in results.glob("matched-*.json")), key=lambda n: (n.split("-")[1], int(n.split("-")[2])))
    win = {name: load(results, name) for name in names}
    wrows = []
    for run, doc in win.items():
        if doc is None:
            continue
        for normalized in (False, True):
            res = (doc["normalized"] if normalized else doc)["trunk"]
            g_last = res["a"][-1] ** 2 + res["r_norm"][-1] ** 2
            wrows.append([run, "row-normalised" if normalized else "raw", f"{doc['anchor_step']}..{doc['steps'][-1]}",
                          len(doc["steps"]), r(100 * res["rho"][0], 2), res["k95"], res["k99"],
                          r(math.sqrt(g_last), 3) if not normalized else None])
    if wrows:
        tables.append(table("Analysis window and matched-loss windows (paper Tables 9 and 10)",
                            [f"{k}.json" for k, v in win.items() if v],
                            ["window", "rows", "window (steps)", "drift rows", "PC1 %", "k95", "k99",
                             "drift ||theta(end) - theta(anchor)|| (derived)"], wrows,
                            "drift (derived) = sqrt(a(last)^2 + ||r(last)||^2) = ||x(last)||, trunk."))
    fi = load(results, "fisher-adamw")
    if fi is not None:
        frows = []
        for c in fi["checkpoints"]:
            q = c["q"]
            frows.append([c["step"], f"{q['backbone']:.3g}", f"{q['random_mean']:.3g}", f"{q.get('pc2', float('nan')):.3g}",
                          r(c["anisotropy"], 2), r(c["anisotropy_se"], 2), r(c["anisotropy_exact"], 2),
                          r(c["top_overlap_backbone"], 4), r(c["grad_backbone_cos_mean"], 4), f"{c['noise_floor']:.2g}",
                          r(c["effective_rank"], 2)])
        tables.append(table("Fisher along the backbone over training", ["fisher-adamw.json"],
                            ["step", "q(v_b)", "mean q(random)", "q(PC2)", "anisotropy", "± se", "anisotropy (exact)",
                             "|<u_1, v_b>|", "mean |cos(g, v_b)|", "noise floor", "effective rank"], frows))
    rh = load(results, "reheat-adamw")
    if rh is not None:
        rrows = []
        for c in rh["conditions"]:
            steps = c["steps"]
            # c["lr"] is the lr of every resumed step (group 0); these conditions hold it constant
            rrows.append([c["name"], f"{c['lr'][0]:.3g}" if c.get("lr") else c["lr_mult"],
                          ", ".join(str(s) for s in steps), ", ".join(f"{x:.3f}" for x in c["eval_loss"]),
                          ", ".join(f"{x:.2f}" for x in c["displacement"]),
                          ", ".join(f"{x:+.3f}" for x in c.get("backbone_coord", [])),
                          ", ".join(f"{x:.2f}" for x in c.get("transverse_residual", [])), c["verdict"]])
        tables.append(table("Reheating from the last checkpoint (fresh AdamW)", ["reheat-adamw.json"],
                            ["condition", "lr", "eval steps", "eval loss", "||theta - theta_0||",
                             "backbone coordinate <d, v_b>", "transverse residual", "verdict"], rrows))
    return tables


# ------------------------------------------------------------------------------------------------ paper 002


def paper_002(results: Path) -> list[dict]:
    tables = []
    crow = []
    srcs = []
    for name, label in (("classify-smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1)"), ("classify-minilm", "all-MiniLM-L6-v2")):
        d = load(results, name)
        if d is None:
            continue
        srcs.append(f"{name}.json")
        crow.append([label, d["vocab_size"], d["dim"], d["pairs"], r(d["mean_c2"], 4), r(d["std_c2"], 4),
                     r(d["frac_abs_c_gt_0_3"], 4), r(d["frac_abs_c_gt_0_5"], 4), r(d["ks_gauss"], 4), r(d["ks_exp"], 4),
                     r(d["bulk_index"], 4), d["class"], d["lora_sufficient"], f"{d['predicted_critical_lora_lr']:.3g}",
                     d["tied_head"]])
    if crow:
        tables.append(table("Bulk embedding geometry (classify-embeddings --exact)", srcs,
                            ["model", "vocab", "dim", "pairs", "mean c^2", "std c^2", "frac |c| > 0.3", "frac |c| > 0.5",
                             "KS gauss", "KS exp", "bulk index", "class", "LoRA sufficient", "predicted eta_c", "tied"],
                            crow))
    bg = load(results, "born-gap")
    if bg is not None:
        rows = [[c["target"].strip(), c["competitor"].strip(), c["pool_size"], r(c["phi"], 4), r(c["signal"], 4),
                 r(c["drag"], 4), r(c["throttle"], 3), r(c["logit_gap"], 2), r(c["pr"], 2), r(c["xi"], 3),
                 r(c["burial_depth"], 2), "yes" if c["burial_depth"] > 1 else "no", r(c["eta_geo"], 3), c["born_rank"],
                 c["softmax_rank"], r(c["phi_ablated"], 4)] for c in bg["contexts"]]
        tables.append(table("Born gap at the base model (born-gap)", ["born-gap.json"],
                            ["target", "competitor", "pool", "Phi", "S", "D", "1 - c_yc^2", "logit gap", "PR", "xi",
                             "burial depth B", "buried (B > 1)", "eta_geo", "Born rank", "softmax rank",
                             "Phi, competitor ablated"], rows, f"unembedding: {bg['unembedding']}"))
    for name, title in (("finetune-lora", "LoRA, lr 2e-4"), ("finetune-full", "full fine-tuning, lr 2e-5")):
        d = load(results, name)
        if d is None:
            continue
        rows = []
        for c in d["contexts"]:
            phi = c["phi"]
            rows.append([c["target"].strip(), r(phi[0], 4), r(phi[-1], 4), c["flip_step"], r(c["jump_ratio"], 2),
                         c["character"], c["failure_type"], c["phi_stop_step"], c["ce_stop_step"],
                         r(c["loss"][0], 3), r(c["loss"][-1], 4), c["pre_resolved"], c["embeddings_unchanged"],
                         c["max_abs_delta_embedding"]])
        tables.append(table(f"finetune-probe, {title}, {d['steps']} steps", [f"{name}.json"],
                            ["target", "Phi(0)", f"Phi({d['steps']})", "flip step", "jump ratio", "character",
                             "failure", "Phi stop", "CE stop", "loss(0)", f"loss({d['steps']})", "pre-resolved",
                             "embeddings unchanged", "max |dE|"], rows,
                            f"optimizer: {d['optimizer']}; targets: {d.get('target_modules')}"))
    for name in ("lora-sweep", "lora-sweep-low"):
        sw = load(results, name)
        if sw is None:
            continue
        crit = sw["critical_lr"]
        flips: dict[str, dict] = {}
        for c in sw["contexts"]:
            flips.setdefault(c["target"].strip(), {})[c["lr"]] = f"{c['flip_step']} / {r(c['phi'][-1], 3)} / {c['character']}"
        rows = [[p["target"].strip(), *[flips[p["target"].strip()].get(lr) for lr in crit["lrs"]], p["critical_lr"],
                 r(2e-4 / p["critical_lr"], 2) if p["critical_lr"] else None] for p in crit["per_context"]]
        cl = load(results, "classify-smollm2")
        pred = cl["predicted_critical_lora_lr"] if cl else None
        med = crit["median"]
        tables.append(table(f"LoRA learning-rate sweep ({name}): flip step / final Phi / character at each rate",
                            [f"{name}.json", "classify-smollm2.json"],
                            ["target", *[f"{lr:g}" for lr in crit["lrs"]], "critical lr (smallest swept rate that flips)",
                             "h = 2e-4 / critical (derived)"],
                            rows, f"{sw['steps']} steps; median critical lr {med}; class prediction eta_c = 2e-4 / h_class = "
                            f"{pred}; ratio median / prediction = {r(med / pred, 3) if med and pred else None} (derived)"))
    return tables


# ------------------------------------------------------------------------------------------------ paper 004


def _rate_rows(acc: dict, predictors: list[str], ks: list[str], criterion: str) -> list[list]:
    return [[p, *[r(acc.get(p, {}).get(k, {}).get(criterion), 3) for k in ks]] for p in predictors]


def paper_004(results: Path) -> list[dict]:
    tables = []
    seeds = ("42", "271", "1337")
    reg_rows = []
    for rule in ("adaptive", "fixed"):
        for s in seeds:
            d = load(results, f"regimes-{rule}-seed{s}")
            if d is None:
                continue
            th = d["thresholds"]
            sim = [x for x in d["similarity"] if x is not None]
            reg_rows.append([s, rule, r(th.get("low"), 6), r(th.get("high"), 6), d["counts"].get("chaotic"),
                             d["counts"].get("transition"), d["counts"].get("stable"), d["counts"].get("unknown"),
                             json.dumps(d["first_entry"]), r(min(sim), 6), r(max(sim), 6)])
    if reg_rows:
        tables.append(table("Regimes per seed", ["regimes-{adaptive,fixed}-seed*.json"],
                            ["seed", "thresholds", "low", "high", "chaotic", "transition", "stable", "unknown",
                             "first entry", "min s_t", "max s_t"], reg_rows))
    for s in seeds:
        for variant, label in (("", "float32 moments"), ("-fp16", "float16 moments (--moment-dtype)"),
                               ("-fp16copy", "float16 moments stored in optimizer.pt (fp16_moments.py)"),
                               ("-quick", "K = 5, 15, 45, 1,024 tokens")):
            d = load(results, f"extrapolate{variant}-seed{s}")
            if d is None:
                continue
            acc = d["acceptance"]
            preds = list(acc)
            ks = sorted({k for p in acc.values() for k in p}, key=int)
            for crit in ("strict", "adaptive", "proximity"):
                tables.append(table(f"extrapolate, seed {s}, {label}: {crit} acceptance (all regimes)",
                                    [f"extrapolate{variant}-seed{s}.json"], ["predictor", *[f"K={k}" for k in ks]],
                                    _rate_rows(acc, preds, ks, crit)))
            err = d["mean_rel_weight_error"]
            tables.append(table(f"extrapolate, seed {s}, {label}: mean relative weight error", [f"extrapolate{variant}-seed{s}.json"],
                                ["predictor", *[f"K={k}" for k in ks]],
                                [[p, *[r(err.get(p, {}).get(k), 4) for k in ks]] for p in preds],
                                "||theta_hat - theta(t+K)|| / ||theta(t+K) - theta_t||, mean over the rows whose t+K is a "
                                "checkpoint (null: none is)"))
            ratio_rows = []
            for p in preds:
                rows = [x for x in d["results"] if x["predictor"] == p]
                row = [p]
                for k in ks:
                    rs = [x["loss_pred"] / x["loss_now"] for x in rows if str(x["K"]) == k
                          and x["loss_pred"] is not None and x["loss_now"]]
                    row.append(f"{statistics.median(rs):.3g}" if rs else None)
                ratio_rows.append(row)
            tables.append(table(f"extrapolate, seed {s}, {label}: median predicted / current loss", [f"extrapolate{variant}-seed{s}.json"],
                                ["predictor", *[f"K={k}" for k in ks]], ratio_rows,
                                "derived: median over checkpoints of loss_pred / loss_now (the paper's 'inflation')"))
            by_reg = d["acceptance_by_regime"]
            rrows = []
            for g, acc_g in by_reg.items():
                for p in preds:
                    rrows.append([g, p, *[r(acc_g.get(p, {}).get(k, {}).get("strict"), 3) for k in ks]])
            tables.append(table(f"extrapolate, seed {s}, {label}: strict acceptance by regime", [f"extrapolate{variant}-seed{s}.json"],
                                ["regime", "predictor", *[f"K={k}" for k in ks]], rrows))
            if d.get("moment_rounding"):
                tables.append(table(f"extrapolate, seed {s}, {label}: moment rounding", [f"extrapolate{variant}-seed{s}.json"],
                                    ["step", "dtype", "entries", "m flushed", "v flushed", "non-finite",
                                     "momentum update rel. change", "adam update rel. change"],
                                    [[m["step"], m["dtype"], m["entries"], r(m["m_flushed"], 5), r(m["v_flushed"], 4),
                                      m["nonfinite"], r(m["momentum_rel_change"], 4), f"{m['adam_rel_change']:.4g}"]
                                     for m in d["moment_rounding"]]))
            if d.get("cascades"):
                tables.append(table(f"extrapolate, seed {s}, {label}: cascades", [f"extrapolate{variant}-seed{s}.json"],
                                    ["cascades"], [[json.dumps(d["cascades"])]]))
            tables.append(table(f"extrapolate, seed {s}, {label}: timing and notes", [f"extrapolate{variant}-seed{s}.json"],
                                ["timing", "notes"], [[json.dumps(d.get("timing")), " / ".join(d.get("notes", []))]]))
    for s in seeds:
        cas = load(results, f"cascades-seed{s}")
        if cas is None or not cas.get("cascades"):
            continue
        crows = [[spec, pred, crit, r(v["full_chain"], 3), r(v["mean_depth"], 2)]
                 for spec, by_pred in cas["cascades"]["summary"].items() for pred, by_crit in by_pred.items()
                 for crit, v in by_crit.items()]
        tables.append(table(f"Cascades, seed {s} (D links of K steps, validated at each link)", [f"cascades-seed{s}.json"],
                            ["D:K", "predictor", "criterion", "full chains accepted", "mean accepted depth"], crows))
    for rule in ("adaptive", "fixed"):
        d = load(results, f"cross-seed-{rule}")
        if d is None:
            continue
        cka = d["cka"]
        tables.append(table(f"cross-seed ({rule} thresholds)", [f"cross-seed-{rule}.json"],
                            ["loss CV", "first-entry std", "regime agreement", "thresholds", "CKA", "seeds"],
                            [[r(d["loss_cv"], 5), json.dumps(d["first_entry_std"]), r(d["regime_agreement"], 4),
                              json.dumps(d["thresholds"]), json.dumps(cka)[:2000], json.dumps(d["seeds"])[:2000]]]))
    return tables


def main() -> None:
    paper, results, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    tables = {"001": paper_001, "002": paper_002, "004": paper_004}[paper](results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"paper": paper, "tables": tables}, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(tables))
    print(f"summary: {out / 'summary.json'}, tables: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
