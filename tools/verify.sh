#!/usr/bin/env bash
# Verify stored notebook outputs: re-execute each chapter with nbval in strict mode and compare every
# output with the stored one -- exactly, except values stored with a tolerance (bnutils.nbval_tolerance,
# loaded for every pytest run by pyproject.toml).
# Usage: tools/verify.sh [chapters/NN_slug.ipynb ...]   (default: every chapter)
# Expects the pinned environment's bin/ first on PATH (make verify does that).
set -euo pipefail
cd "$(dirname "$0")/.."
# A first matplotlib import builds the font cache and says so on stderr; do it outside nbval.
python -c "import matplotlib.pyplot"
if [ "$#" -eq 0 ]; then set -- chapters; fi
python -m pytest "$@" --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg \
  --nbval-current-env --nbval-cell-timeout=300
