#!/usr/bin/env bash
# Submit the rdistill job to a Ray cluster:  jobs/submit.sh CONFIG OUTPUT [extra rdistill.pds arguments ...]
#   RAY_ADDRESS   the cluster's dashboard (job server), default http://127.0.0.1:8265
#   RAY_AUTH_MODE set to "token" when the head runs with token authentication (Ray's default from 2.5x)
# The working directory (this repo) is uploaded with the job; the cluster's Python needs rdistill's
# dependencies (the image from cluster/Dockerfile has them; locally, the .venv that ran `ray start`).
# OUTPUT must be an absolute path on storage the cluster's nodes mount (NFS, a PVC, ...): the job runs inside Ray's
# uploaded copy of the working directory, so a relative path would land there, where nobody finds it.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG OUTPUT [--input SHARDS | --embeddings DIR] [--num-pairs M] [--set k=v ...]" >&2
    exit 2
fi
config=$1 output=$2
shift 2
case "$output" in
    /*) ;;
    *)
        echo "error: OUTPUT $output is not an absolute path: give one on storage the cluster's nodes mount;" \
             "the job runs in Ray's uploaded copy of the working directory, where a relative output would be" \
             "lost" >&2
        exit 2
        ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$here" \
    --runtime-env "$here/jobs/runtime_env.yaml" \
    -- python -m rdistill.pds --config "$config" --output "$output" "$@"
