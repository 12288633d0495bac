#!/usr/bin/env bash
# CI parity gate: build every artifact of a small model (the embedded default when it exists),
# compare them all with `paragon-export parity`, print parity.md. Non-zero exit on any breach.
# Usage: scripts/ci_parity.sh [WORK_DIR]   (PYTHON=... to pick the interpreter; default .venv)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="${1:-$ROOT/out/ci_parity}"
mkdir -p "$WORK"
mapfile -t ARTS < <("$PY" "$ROOT/scripts/ci_parity.py" "$WORK")
if [ "${#ARTS[@]}" -lt 2 ]; then
  echo "ci_parity: building the artifacts failed" >&2
  exit 2
fi
# the first line is the source checkpoint: it is the reference (fused for the comparison)
"$PY" -c "from paragon_export.cli import main; main(prog_name='paragon-export')" parity "${ARTS[@]:1}" --ref "${ARTS[0]}" --localize -o "$WORK/report" --force
