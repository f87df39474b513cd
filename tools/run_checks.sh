#!/usr/bin/env bash
# Every check of the project, in order, with the time each phase takes.
# Expects the pinned environment's bin/ first on PATH (make test does that).
set -euo pipefail
cd "$(dirname "$0")/.."

phase() {  # phase NAME COMMAND...: run, then print how long it took
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - start)) s"
}

phase "ruff" ruff check bnutils tests tools benchmarks chapters
# A first matplotlib import builds the font cache and says so on stderr; do it outside pytest.
phase "warm matplotlib" python -c "import matplotlib.pyplot"
phase "strict book build" jupyter-book build . --all -W -n --keep-going
# tests/test_browser.py opens every page of the build above in headless Chromium (screenshots/).
phase "pytest (unit, hygiene, site and browser)" python -m pytest tests
phase "verify (nbval strict, stated tolerances)" bash tools/verify.sh
