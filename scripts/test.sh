#!/usr/bin/env bash
# Runs the whole test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
exec python -m pytest tests "$@"
