#!/usr/bin/env bash
# The main job: train on the bundled novel with the quick preset, then print a
# sample. Extra arguments go to the trainer, e.g. scripts/train.sh --units=256.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec python -m trainer.task --flagfile=configs/quick.flags "$@"
