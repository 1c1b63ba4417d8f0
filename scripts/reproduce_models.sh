#!/usr/bin/env bash
# Reproduce every shipped file in weights/ on the CPU (2 cores: about 75 minutes) or a GPU.
# The budgets below are the ones used for the shipped models and the model card.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training splits                                              # weights/splits/*.json
python -m training train --all --epochs 8 --epoch-samples 1536         # 5 bundles, fused-binary/score, index
python -m training camloc                                              # weights/cam_localisation.json
python -m training screen --epochs 5 --epoch-samples 1024              # weights/screen.json (validation only)
python -m training cv --epochs 6 --epoch-samples 1024                  # weights/cv.json (5 patient-level folds)
python -m training card                                                # weights/README.md + figures
