"""Ratios of a saved benchmark run: ``python benchmarks/summarize.py RESULTS.json``.

``python benchmarks/summarize.py --merge OUT.json IN.json...`` first joins the runs of several
pytest invocations (as ``gpu_check.sh`` makes, one per suite) into one JSON: the first file's
machine and commit information, every file's benchmarks in order; missing inputs are named and
skipped, and so is a benchmark that a time box's SIGINT cut short (saved without extra_info).

For each (suite: file::test function, case, mode) with providers: median time, speed-up of
every provider over the official-style baseline (``official_loop`` / ``official_style``; the
DiT suite's ``original``, and its ``original_repa`` as a second baseline) and over
``torch.compile`` of the reference, TFLOP/s, the fraction of the card's bf16 matmul peak,
images/s, MFU and peak memory where recorded (peak extra memory against the eager reference's).
"""
import json
import sys
from collections import defaultdict

# provider: the name its "x... vs" column gives it; the first present is a suite's baseline
BASELINES = {"official_loop": "official", "official_style": "official", "original": "original"}


def merge(out: str, paths: list) -> int:
    """Join the pytest-benchmark JSONs ``paths`` into ``out``; returns how many were missing."""
    merged, missing = None, 0
    for path in paths:
        try:
            data = json.load(open(path))
        except (OSError, ValueError) as error:
            print(f"merge: skipped {path}: {error}", file=sys.stderr)
            missing += 1
            continue
        if merged is None:
            merged = dict(data, benchmarks=[])
        for bench in data.get("benchmarks", []):
            # one cut short by the time box's SIGINT is saved with no extra_info: drop it
            if bench.get("extra_info"):
                merged["benchmarks"].append(bench)
            else:
                print(f"merge: dropped {bench.get('name')} (interrupted, "
                      f"{bench.get('stats', {}).get('rounds')} round(s))", file=sys.stderr)
        for key, value in data.get("repa_fast_machine", {}).items():
            merged.setdefault("repa_fast_machine", {}).setdefault(key, value)
    if merged is None:
        merged = {"benchmarks": []}
    with open(out, "w") as f:
        json.dump(merged, f, indent=2)
    return missing


def main(path: str) -> None:
    data = json.load(open(path))
    machine = data.get("repa_fast_machine", {})
    print(f"{machine.get('device')}  torch {machine.get('torch')}  triton {machine.get('triton')}"
          f"  {machine.get('date')}  bf16 matmul peak {machine.get('bf16_matmul_peak_tflops', 0):.0f} TFLOP/s"
          + (f"  fp32 matmul peak {1e3 * machine['fp32_matmul_peak_tflops']:.0f} GFLOP/s"
             if "fp32_matmul_peak_tflops" in machine else ""))
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" in info:
            # file::function: one file may hold several suites (test_bench_alignment.py: the
            # op and its native backend, whose case names overlap)
            suite = bench.get("fullname", bench["name"]).split("[")[0].split("/")[-1]
            key = (suite, info.get("case", ""), info.get("mode", ""))
            groups[key][info["provider"]] = (bench["stats"]["median"], info)
    for (suite, case, mode), rows in sorted(groups.items()):
        print(f"\n{suite}  {case} {mode}")
        base = next((name for name in BASELINES if name in rows), None)
        loop = rows[base][0] if base else None
        repa_base = rows.get("original_repa", (None,))[0]  # DiT: the original step with REPA
        compiled = rows.get("compiled_reference", (None,))[0]
        ref_mem = rows.get("eager_reference", (None, {}))[1].get("peak_extra_mem_mib")
        for provider, (median, info) in rows.items():
            parts = [f"  {provider:<20} {median * 1e3:9.3f} ms"]
            if loop:
                parts.append(f"x{loop / median:5.2f} vs {BASELINES[base]}")
            if repa_base:
                parts.append(f"x{repa_base / median:5.2f} vs original_repa")
            if compiled:
                parts.append(f"x{compiled / median:5.2f} vs compiled")
            parts.append(f"{info.get('tflops_per_s', 0):7.3g} TFLOP/s")
            if "fraction_of_matmul_peak" in info:
                parts.append(f"{100 * info['fraction_of_matmul_peak']:5.1f}% of peak")
            if "images_per_s" in info:
                parts.append(f"{info['images_per_s']:8.1f} img/s")
            if "mfu_vs_measured_peak" in info:
                parts.append(f"MFU {100 * info['mfu_vs_measured_peak']:5.1f}%")
            if "peak_mem_gib" in info:
                parts.append(f"{info['peak_mem_gib']:6.1f} GiB peak")
            mem = info.get("peak_extra_mem_mib")
            if mem is not None:
                parts.append(f"+{mem:8.1f} MiB" + (f" ({100 * mem / ref_mem:5.1f}% of eager)"
                                                   if ref_mem else ""))
            print("  ".join(parts))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        sys.exit(1 if merge(sys.argv[2], sys.argv[3:]) else 0)
    main(sys.argv[1])
