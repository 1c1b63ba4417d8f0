#!/usr/bin/env bash
# Reproduce every shipped file in weights/ on a GPU (about an hour) or the CPU (2 cores: about 14 hours, most of it
# the three 128 px networks; see README "The recipe search").
# The budgets below are the ones used for the shipped models and the model card.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training splits                                              # weights/splits/*.json (deterministic)
python -m training finder                                              # nodule finder bundles + weights/finder.json
python -m training finder --only mine                                  # one round of hard-negative mining
python -m training outliner                                            # nodule outliner bundle (~10 min CPU)
python -m training train --all                                         # 5 bundles, fused-binary (uses the outliner)/score, index
for m in nodule-binary slice-binary fused-binary nodule-score slice-score fused-score; do  # app reference cases
  python -m training evaluate --model "$m" --split test --n-boot 200 --predictions "weights/reference/$m-test.csv"
done
python -m training sizes                                               # weights/size_measures.json (chosen on validation)
python -m training outline-features                                    # weights/outline_features.json (validation decides)
python -m training score-inputs                                        # weights/score_inputs.json (validation decides)
python -m training ordinal-calls                                       # weights/ordinal_calls.json (validation decides)
python -m training class-bias                                          # weights/class_bias.json (validation decides)
python -m training operating-points                                    # weights/operating_points.json (validation thresholds)
python -m training tta                                                 # weights/tta.json (validation decides)
python -m training camloc                                              # cam_layer in each spec + weights/cam_localisation.json
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then  # days on a CPU: GPU only
  python -m training search --workers 16                               # weights/search.json (validation)
fi
python -m training screen --epochs 5 --epoch-samples 1024              # weights/screen.json (validation only)
python -m training cv --input-size 128 --field-mm 24 --epochs 60 --epoch-samples 3072 --patience 12 \
  --stages 4,20 --seed 1                                               # weights/cv.json: nodule-binary's setup, 5 folds
python -m training ablate --epochs 30 --stages 2,10 --patience 8 --epoch-samples 1536  # weights/ablation.json (validation)
python -m training card                                                # weights/README.md + figures
