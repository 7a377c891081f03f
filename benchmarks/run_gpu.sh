#!/usr/bin/env bash
# Run the benchmark suites on a GPU and keep the JSON and the ratio summary under
# benchmarks/results/ as <date>-<card>.json / .txt (commit both with the command used).
set -euo pipefail
cd "$(dirname "$0")/.."
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="benchmarks/results/$(date +%F)-${card}"
pytest benchmarks --benchmark-only -q --benchmark-json "${out}.json" "$@"
python benchmarks/summarize.py "${out}.json" | tee "${out}.txt"
