#!/usr/bin/env bash
# Run the benchmark suites on a GPU and keep the JSON and the ratio summary under
# benchmarks/results/ as <date>-<card>.json / .txt (commit both with the command used). This
# runs every suite at every GPU shape (longer than one 15-minute lease: there, use
# gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="benchmarks/results/$(date +%F)-${card}"
# a failing suite still leaves the others' numbers: summarise them, then report the failure
status=0
pytest benchmarks --benchmark-only -q --benchmark-json "${out}.json" "$@" || status=$?
python benchmarks/summarize.py "${out}.json" | tee "${out}.txt"
exit "$status"
