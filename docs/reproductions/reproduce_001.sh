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
ADAMW=$RUNS/001-adamw
SGD=$RUNS/001-sgd

# Trajectory PCA of all 51 checkpoints (anchor checkpoint-0 = the initialisation), raw and row-normalised rows.
measure backbone-adamw backbone "$ADAMW" --normalize-rows --device cpu \
  --save-vectors "$REPORTS/adamw-vectors.safetensors" --plot "$REPORTS/plots-backbone-adamw"
figures backbone-adamw "$REPORTS/plots-backbone-adamw" backbone_trunk_a_r.png backbone_rho.png \
  backbone_update_alignment.png backbone_window_rotation.png

# The paper's analysis window [600, 2000] of 10,000 steps (anchor 600), at the same fractions of our 3,000 steps:
# [180, 600], anchor 180, seven drift rows as in the paper (Table 9).
measure window-adamw backbone "$ADAMW" --anchor 180 --steps 180:600 --normalize-rows --device cpu

# Fisher stiffening curve (section 4.5): six checkpoints from early to late (60, 600, 1200, 1800, 2400, 3000), M = 32
# mini-batches of 8 windows of 128 tokens (half the run's batch, for CPU time) from the run's own training text,
# along the trunk backbone of all 51 checkpoints.
measure fisher-adamw fisher "$ADAMW" --steps 60,600,1200,1800,2400,3000 \
  --vectors "$REPORTS/adamw-vectors.safetensors" --data "$ADAMW/train.txt" --seq-len 128 --batches 32 --batch-size 8 \
  --device cpu

# Reheating (section 6): from the last checkpoint, a fresh AdamW at the paper's three rates 1e-3, 6e-4, 3e-4, held
# constant, on the run's training text, 50 steps of 8 windows (the paper: 2,000 steps; bounded for CPU time);
# displacement split into backbone coordinate and transverse residual.
measure reheat-adamw resume-probe "$ADAMW/checkpoint-3000" --reset-optimizer --lr 1e-3 --lr-mult 1,0.6,0.3 \
  --warmup-steps 0 --no-boundary-probe --train-steps 50 --batch-size 8 \
  --vectors "$REPORTS/adamw-vectors.safetensors" --data "$ADAMW/train.txt" --seq-len 128 --eval-tokens 8192 \
  --device cpu --plot "$REPORTS/plots-reheat-adamw"
figures reheat-adamw "$REPORTS/plots-reheat-adamw"

# The SGD control (section 5): the same model, data, schedule and seed with SGD + momentum (Table 8, run C).
train 001-sgd --optimizer sgd --seed 42
measure backbone-sgd backbone "$SGD" --normalize-rows --device cpu --plot "$REPORTS/plots-backbone-sgd"
figures backbone-sgd "$REPORTS/plots-backbone-sgd" backbone_trunk_a_r.png backbone_rho.png
measure window-sgd backbone "$SGD" --anchor 180 --steps 180:600 --normalize-rows --device cpu
# Both whole runs side by side (a(t), ||r(t)||, rho_k of each)
compare_plot compare-backbone "adamw,sgd" "$REPORTS/backbone-adamw.h5" "$REPORTS/backbone-sgd.h5"
# Matched loss (section 5.2, Table 10): SGD over its plateau, at the paper's fractions of the run ([2000, 2400] and
# [1800, 2600] of 4,000 steps: [1500, 1800] and [1380, 1920] of 3,000, the nearest checkpoints), against AdamW over
# the early windows in which its validation loss passes SGD's plateau loss (about 6.4, passed at step 120; the
# paper's [1, 200, 400], [1, 200, 400, 600] and [200, 400, 600] of 10,000 steps: anchors 0 and 60, up to step 120 / 180).
for w in 1500:1800 1380:1920; do
  measure "matched-sgd-${w/:/-}" backbone "$SGD" --anchor "${w%:*}" --steps "$w" --normalize-rows --device cpu
done
for w in 0:120 0:180 60:180; do
  measure "matched-adamw-${w/:/-}" backbone "$ADAMW" --anchor "${w%:*}" --steps "$w" --normalize-rows --device cpu
done

summarize
