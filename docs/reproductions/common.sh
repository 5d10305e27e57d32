# Shared set-up of docs/reproductions/reproduce_00N.sh (sourced, not run).
#
# Environment (all optional):
#   RUNS     where the trained runs and the HDF5 reports live (default .cache/reproductions, ignored by git)
#   PY, CLI  the Python and the ckptaudit of the checkout's .venv (make install creates them)
#   THREADS  torch threads per command (default 1); NICE the command prefix (default "nice -n 19")
#   FORCE=1  rerun a command whose JSON already exists (by default a finished command is not rerun)
#   TRAIN=0  train nothing, resume nothing: measure the cached runs with the checkpoints they have
#   VARIANT  a name for a second set of results of the same paper (e.g. VARIANT=full: $RUNS/results/004-full,
#            $RUNS/reports/004-full, docs/reproductions/004-full), so that a rerun over other checkpoints keeps the
#            first set
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
CLI=${CLI:-$ROOT/.venv/bin/ckptaudit}
RUNS=${RUNS:-$ROOT/.cache/reproductions}
THREADS=${THREADS:-1}
NICE=${NICE:-nice -n 19}
FORCE=${FORCE:-0}
TRAIN=${TRAIN:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
[ -x "$CLI" ] || { echo "no $CLI: run 'make install' first" >&2; exit 2; }

# train NAME ARGS...: docs/reproductions/train_lm.py into $RUNS/NAME (skipped when the run is finished; resumed from
# its newest checkpoint when it was interrupted)
train() {
  local name=$1; shift
  if [ -f "$RUNS/$name/DONE" ]; then echo "$name: trained ($(cat "$RUNS/$name/DONE"))"; return; fi
  if [ "$TRAIN" = 0 ]; then
    echo "$name: not trained further (TRAIN=0): $(find "$RUNS/$name" -maxdepth 1 -name 'checkpoint-*' | wc -l) checkpoints"
    return
  fi
  if [ -n "$(find "$RUNS/$name.log" -mmin -10 2>/dev/null)" ]; then
    echo "$name: a training is in progress (its log changed in the last 10 minutes); rerun when it has finished" >&2
    exit 3
  fi
  local resume=()
  if [ -n "$(find "$RUNS/$name" -name trainer_state.json 2>/dev/null | head -1)" ]; then
    resume=(--resume)  # an interrupted run continues from its newest checkpoint (the Trainer's own resume)
    [ -f "$RUNS/$name.log" ] && cat "$RUNS/$name.log" >> "$RUNS/$name.log.interrupted"
  fi
  echo "$name: training ${resume[*]} (log: $RUNS/$name.log)"
  $NICE "$PY" docs/reproductions/train_lm.py "$RUNS/$name" --threads "$THREADS" "${resume[@]}" "$@" \
    > "$RUNS/$name.log" 2>&1
}

# Each script sets PAPER (001, ...): the JSON of every command goes to RESULTS=$RUNS/results/$PAPER, the HDF5 reports
# and plots to REPORTS=$RUNS/reports/$PAPER, the figures and the summary (the numbers the document quotes, read from
# the JSON by docs/reproductions/summarize.py) to FIGURES=docs/reproductions/$PAPER, which is checked in.
setup_paper() {
  PAPER=$1
  local dir=$PAPER${VARIANT:+-$VARIANT}
  RESULTS=$RUNS/results/$dir
  REPORTS=$RUNS/reports/$dir
  FIGURES=$ROOT/docs/reproductions/$dir
  mkdir -p "$RESULTS" "$REPORTS" "$FIGURES"
}

# summarize: docs/reproductions/summarize.py reads $RESULTS/*.json and writes $FIGURES/summary.json (every number
# the document quotes, with the JSON file and key it came from) and $FIGURES/summary.md (the same as tables)
summarize() {
  "$PY" docs/reproductions/summarize.py "$PAPER" "$RESULTS" "$FIGURES"
}

# measure NAME COMMAND ARGS...: ckptaudit COMMAND ARGS --json --out $REPORTS/NAME.h5 > $RESULTS/NAME.json.
# The wall time goes to $RESULTS/wall_seconds.tsv. A JSON that exists is kept unless FORCE=1.
measure() {
  local name=$1; shift
  local json=$RESULTS/$name.json
  if [ -s "$json" ] && [ "$FORCE" != 1 ]; then echo "$name: kept $json"; return; fi
  echo "$name: ckptaudit $*"
  local t0; t0=$(date +%s)
  $NICE "$CLI" "$@" --json --out "$REPORTS/$name.h5" > "$json.tmp"
  mv "$json.tmp" "$json"
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$RESULTS/wall_seconds.tsv"
}

# figures NAME DIR [PATTERN...]: copy the PNGs a --plot DIR wrote (those matching a PATTERN, default all) into $FIGURES as
# NAME-<file>.png, at most 900 px wide and in a 64-colour palette (tens of KB each)
figures() {
  local name=$1 dir=$2; shift 2
  "$PY" - "$name" "$dir" "$FIGURES" "$@" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
name, src, dst, wanted = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
for f in sorted({p for w in wanted or ["*.png"] for p in src.glob(w)}):
    im = Image.open(f).convert("RGB")
    if im.width > 900:
        im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
    im = im.quantize(colors=64)  # line plots: a small palette keeps each file to tens of KB
    im.save(dst / f"{name}-{f.name}", optimize=True)
EOF
}

# compare_plot NAME LABELS REPORT...: `ckptaudit compare REPORT... --plot` into $REPORTS/plots-NAME (its JSON to
# $RESULTS/NAME.json), then the figure into $FIGURES
compare_plot() {
  local name=$1 labels=$2; shift 2
  $NICE "$CLI" compare "$@" --labels "$labels" --plot "$REPORTS/plots-$name" --json > "$RESULTS/$name.json"
  figures "$name" "$REPORTS/plots-$name"
}

