#!/usr/bin/env bash
# Short GPU benchmark of READ against every baseline (benchmarks/gpu_bench.py), in one go, on one GPU.
#
#   bash benchmarks/gpu.sh                  # both passes below, ~8 minutes on an H100 (estimated, not yet run)
#   bash benchmarks/gpu.sh --dtype bf16     # any gpu_bench.py option passes through
#   bash benchmarks/gpu.sh --tiny --output /tmp/r.json   # tiny config: runs on a CPU in seconds
#
# Nothing is downloaded: the models are random configs, and a missing readapt is installed from this checkout
# without its dependencies. Set PYTHON to choose the interpreter.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
    if command -v python >/dev/null 2>&1; then python_bin=python; else python_bin=python3; fi
fi

if ! "$python_bin" -c "import readapt" >/dev/null 2>&1; then
    echo "readapt is not importable by $python_bin: installing this checkout (editable, no dependencies)" >&2
    # --no-build-isolation and --no-index: the build uses the setuptools already installed, never the network.
    if ! "$python_bin" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . >&2; then
        echo "editable install failed: using src/ on PYTHONPATH instead" >&2
        export PYTHONPATH="$repo_root/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

# gpu_bench.py ends by printing where the results went (the JSON file and the Markdown table next to it).
if [[ $# -gt 0 ]]; then
    exec "$python_bin" benchmarks/gpu_bench.py "$@"
fi
# No options: the two passes that the results README reports, in about 8 minutes on an H100 (estimated from the
# last run's per-step times; not yet run this way) -
# every method on T5-base and T5-large in fp32, then READ and full fine-tuning on T5-base with a bfloat16 frozen
# backbone and READ's side network computing in bfloat16 (full fine-tuning under bf16 autocast).
"$python_bin" benchmarks/gpu_bench.py --time-budget 400 --output docs/results/gpu/gpu_results.json
"$python_bin" benchmarks/gpu_bench.py --dtype bf16-native --models t5-base --methods read,full --time-budget 120 \
    --output docs/results/gpu/t5_base_bf16_native.json
