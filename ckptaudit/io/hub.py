"""Hub repositories with checkpoint revisions (Pythia, OLMo...: branches ``step1000``, ``step2000``...) read from
the local cache as one run, through huggingface_hub's cache API (``scan_cache_dir``), never the network.

``revision_checkpoints(repo_id, pattern)`` takes the refs of the cached repo whose names match the glob
``pattern`` (``step*``), one checkpoint per revision, the step being the number in the revision name. Revisions
whose weight files are the same blobs as an earlier revision's (byte-identical: the cache stores one blob per
content hash) are not a second step: they are left out and listed with the revision they duplicate. A repo that
is not cached, or no matching revision, is one error whose hint names ``hf download``.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

from ckptaudit.errors import HubNotCachedError, LayoutError

_STEP_RE = re.compile(r"(\d+)(?!.*\d)")  # the last number in the revision name


def _download_hint(repo_id: str, pattern: str) -> str:
    return (f"ckptaudit never downloads: fetch the revisions on a machine with access, e.g. "
            f"`hf download {repo_id} --revision {pattern.replace('*', '1000')}` for each, or pass a local run directory")


def cached_repo(repo_id: str) -> Any:
    """huggingface_hub's CachedRepoInfo of model ``repo_id`` in the local cache; HubNotCachedError otherwise."""
    from huggingface_hub import scan_cache_dir

    from ckptaudit.io.models import hub_cache_dir

    cache = hub_cache_dir()
    if not cache.is_dir():
        raise HubNotCachedError(f"{repo_id}: no local hub cache at {cache}", hint=_download_hint(repo_id, "step*"))
    info = scan_cache_dir(cache)
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            return repo
    raise HubNotCachedError(f"{repo_id}: not in the local hub cache at {cache}", hint=_download_hint(repo_id, "step*"))


def revision_checkpoints(repo_id: str, pattern: str, make_candidate: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    """The checkpoint candidates of the cached revisions of ``repo_id`` matching ``pattern``, and what was left out
    (path, why). ``make_candidate(snapshot_dir, step)`` builds one candidate (io.discover's folder reader)."""
    repo = cached_repo(repo_id)
    chosen = []
    for revision in repo.revisions:
        for ref in sorted(revision.refs):
            if fnmatch.fnmatchcase(ref, pattern):
                m = _STEP_RE.search(ref)
                if m is None:
                    raise LayoutError(f"{repo_id}@{ref}: no step number in the revision name",
                                      hint="choose revisions named like step1000 with --revisions")
                chosen.append((int(m.group(1)), ref, revision))
    if not chosen:
        refs = sorted(r for rev in repo.revisions for r in rev.refs)
        raise HubNotCachedError(
            f"{repo_id}: no cached revision matches {pattern!r} (cached: {', '.join(refs[:12]) or 'none'})",
            hint=_download_hint(repo_id, pattern))
    chosen.sort(key=lambda item: (item[0], item[1]))
    candidates, left_out = [], []
    seen: dict[tuple, str] = {}
    for step, ref, revision in chosen:
        cand = make_candidate(Path(revision.snapshot_path), step)
        if cand is None:
            left_out.append((f"{repo_id}@{ref}", "no model weights in this revision's cached files"))
            continue
        blobs = {Path(f.file_path).name: str(f.blob_path) for f in revision.files}
        key = tuple(sorted(blobs.get(Path(w).name, str(w)) for w in cand.parts.get("weight_files", ())))
        if key in seen:
            left_out.append((f"{repo_id}@{ref}", f"its weight files are byte-identical to {repo_id}@{seen[key]} "
                             "(the same cached blobs): not a separate step"))
            continue
        seen[key] = ref
        candidates.append(cand)
    return candidates, left_out
