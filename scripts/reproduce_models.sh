#!/usr/bin/env bash
# Reproduce every shipped file in weights/ (about 90 minutes on a 2-core CPU; minutes on a GPU, used when present).
# train --all trains the nodule model, the slice view and the histology model, the nodule finder (with one round of
# hard-negative mining), then builds the similar-case index and its atlas, measures the maps and writes the card.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training splits        # weights/splits/*.json (deterministic)
python -m training train --all   # every network and record the app loads, then weights/README.md
python -m training card --check  # the card matches the records it was written from
