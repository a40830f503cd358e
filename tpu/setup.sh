#!/usr/bin/env bash
# Prepare every worker: sync the code, then a virtualenv with jax[tpu]==JAX_VERSION and
# requirements.txt, and (with GCS_BUCKET set) the bucket mounted at GCS_MOUNT with gcsfuse, so
# that checkpoints written by all hosts land in one place. Safe to re-run: an existing
# virtualenv is reused and pip only installs what is missing.
#
#   tpu/setup.sh --env tpu/examples/v5p-64.env [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
no_options
sync_code
setup_workers
