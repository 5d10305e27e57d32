"""`ckptaudit architectures [NAME]`: the architecture families ckptaudit knows, and where each file lives."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptaudit.cli.app import app
from ckptaudit.cli.common import LocalSession
from ckptaudit.cli.options import JsonOpt, QuietOpt, RoleMapOpt


@app.command()
def architectures(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Show one family's tensor rules.")] = None,
    role_map: RoleMapOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List the architecture families: their config.json names (architectures / model_type), fused layouts,
    experts, LoRA targets, final norm and the data file each lives in. With NAME, that family's tensor rules.
    With --role-map, the file is validated and listed beside the shipped families (or in place of the one it
    replaces).

    Example: ckptaudit architectures phi3
    """
    from ckptaudit.errors import UsageError
    from ckptaudit.io import architectures as fam
    from ckptaudit.io.roles import load_role_map

    output = LocalSession("architectures", None, json_out, quiet).output
    user = load_role_map(role_map) if role_map is not None else None
    families = fam.families_with(user)
    if user is not None and user.name == "custom":
        families = {**families, "custom": user}
    rows = fam.describe(families)
    if name is None:
        output.json({"families": rows, "folder": str(fam.shipped_folder())})
        if output.human:
            folder = str(fam.shipped_folder())

            def where(path: str) -> str:  # shipped files by name; a user's file by its path
                return path[len(folder) + 1:] if path.startswith(folder + "/") else path

            output.table(f"{len(rows)} architecture families (files in {folder})",
                         ["family", "model_type", "fused", "experts", "LoRA targets", "final norm", "file"],
                         [[r["name"], ", ".join(r["model_types"] or r["architectures"][:1]) or "—",
                           ", ".join(r["fused"]) or "—", "yes" if r["experts"] else "—",
                           ", ".join(r["lora_targets"]) or "—", ", ".join(r["final_norm"]) or "—", where(r["file"])]
                          for r in rows])
        return
    if name not in families:
        raise UsageError(f"no architecture family named {name!r}", hint=f"known: {', '.join(sorted(families))}")
    family = families[name]
    rules = [{"pattern": r.text, "role": r.role, "fused": r.fused, "parts": list(r.parts) or None,
              "heads": r.heads, "experts": r.experts, "kind": r.kind, "signature": r.signature}
             for r in family.rules]
    row = next(r for r in rows if r["name"] == name)
    output.json({**row, "rules": rules})
    if output.human:
        output.print(f"[bold]{name}[/bold]: {family.description}")
        output.print(f"file: {family.source}" + (f" (extends {family.extends})" if family.extends else ""))
        output.print(f"config.json: architectures {', '.join(family.architectures) or '—'}; "
                     f"model_type {', '.join(family.model_types) or '—'}; orientation {family.orientation or '—'}")
        output.table("tensor rules, first match wins", ["pattern", "role / layout", "experts axis", "signature"],
                     [[r["pattern"], r["role"] or f"{r['fused']} -> {'|'.join(r['parts'])}",
                       "—" if r["experts"] is None else str(r["experts"]), "yes" if r["signature"] else "no"]
                      for r in rules])
