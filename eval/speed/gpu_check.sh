#!/usr/bin/env bash
# GPU check of StreetCLIP at ViT-L/14-336 (eval/speed/gpu_check.py says what it prints), within a time limit.
# It installs nothing: the project must already be installed in this Python with `pip install -e ".[dev]"`.
#
#   bash eval/speed/gpu_check.sh                            # on the GPU machine, from anywhere
#   bash eval/speed/gpu_check.sh --device cpu --steps 1     # a dry run on the tiny test model
#
# GPU_CHECK_TIMEOUT_S (default 270) bounds the whole run. Exit status: that of gpu_check.py (0 checks passed,
# 1 bfloat16 answers disagree, 2 usage error), 3 when the project is not installed, 124 when the limit was hit.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 3
limit_s="${GPU_CHECK_TIMEOUT_S:-270}"
python="${PYTHON:-python}"

# Found, not imported: importing torch and transformers takes seconds, and the check imports them next anyway.
find_modules='import importlib.util, sys; sys.exit(not all(map(importlib.util.find_spec, sys.argv[1:])))'
if ! "$python" -c "$find_modules" modeling_streetclip transformers torch 2>/dev/null; then
    echo "gpu_check: the streetclip package is not importable by $(command -v "$python" || echo "$python");" \
        "install the project first: pip install -e \".[dev]\"" >&2
    exit 3
fi

# Everything is built locally; never reach for the Hub (the GPU machine has no network).
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# -u: unbuffered, so that the lines printed before a timeout still reach the log.
timeout --kill-after=10 "$limit_s" "$python" -u eval/speed/gpu_check.py "$@"
status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check: stopped after ${limit_s} s (GPU_CHECK_TIMEOUT_S); the lines above are what finished." >&2
fi
exit "$status"
