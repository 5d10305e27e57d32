#!/usr/bin/env bash
# Paper 001 (drift backbone, transverse dynamics): the measurements of docs/reproductions.md, section 001.
#
#   bash docs/reproductions/reproduce_001.sh         # after `make install`
#
# Trains (once, cached in $RUNS) the AdamW and the SGD run of docs/reproductions/train_lm.py: about an hour each
# on one free CPU core, two or more when the machine is shared. Then runs backbone, fisher and resume-probe on them.
# Writes the JSON of every command to $RUNS/results/001/, the figures and summary.json (the numbers the document
# quotes) to docs/reproductions/001/, the HDF5 reports and the backbone
# vectors to $RUNS/reports/001/. See common.sh for the environment variables.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_paper 001

train 001-adamw --optimizer adamw --seed 42
train 001-sgd --optimizer sgd --seed 42
ADAMW=$RUNS/001-adamw
SGD=$RUNS/001-sgd

# Trajectory PCA of all 51 checkpoints (anchor checkpoint-0 = the initialisation), raw and row-normalised rows.
measure backbone-adamw backbone "$ADAMW" --normalize-rows --device cpu \
  --save-vectors "$REPORTS/adamw-vectors.safetensors" --plot "$REPORTS/plots-backbone-adamw"
figures backbone-adamw "$REPORTS/plots-backbone-adamw" backbone_trunk_a_r.png backbone_rho.png \
  backbone_update_alignment.png backbone_window_rotation.png
measure backbone-sgd backbone "$SGD" --normalize-rows --device cpu --plot "$REPORTS/plots-backbone-sgd"
figures backbone-sgd "$REPORTS/plots-backbone-sgd" backbone_trunk_a_r.png backbone_rho.png

# The paper's analysis window [600, 2000] of 10,000 steps (anchor 600), at the same fractions of our 3,000 steps:
# [180, 600], anchor 180, seven drift rows as in the paper (Table 9).
measure window-adamw backbone "$ADAMW" --anchor 180 --steps 180:600 --normalize-rows --device cpu
measure window-sgd backbone "$SGD" --anchor 180 --steps 180:600 --normalize-rows --device cpu

# Fisher stiffening curve (section 4.5): every fifth checkpoint, M = 32 mini-batches of the run's batch size (16
# windows of 128 tokens) from the run's own training text, along the trunk backbone of all 51 checkpoints.
measure fisher-adamw fisher "$ADAMW" --steps ::5 --vectors "$REPORTS/adamw-vectors.safetensors" \
  --data "$ADAMW/train.txt" --seq-len 128 --batches 32 --device cpu

# Reheating (section 6): from the last checkpoint, a fresh AdamW at the paper's three rates 1e-3, 6e-4, 3e-4, held
# constant, on the run's training text; displacement split into backbone coordinate and transverse residual.
measure reheat-adamw resume-probe "$ADAMW/checkpoint-3000" --reset-optimizer --lr 1e-3 --lr-mult 1,0.6,0.3 \
  --warmup-steps 0 --no-boundary-probe --steps 200 --vectors "$REPORTS/adamw-vectors.safetensors" \
  --data "$ADAMW/train.txt" --seq-len 128 --eval-tokens 16384 --device cpu --plot "$REPORTS/plots-reheat-adamw"
figures reheat-adamw "$REPORTS/plots-reheat-adamw"

summarize
