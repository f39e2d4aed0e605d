#!/usr/bin/env bash
# Run one agcg command on every worker of a Cloud TPU VM slice.
#
#   bash launch/tpu_vm.sh NAME ZONE -- train-gan --config configs/paper.py --workdir gs-or-shared/runs/paper
#
# 1. copies this project to every worker (~/agcg-jax), 2. sets it up there
# (idempotent: launch/setup.sh, plus jax[tpu] in the same venv), 3. runs
# `agcg --distributed COMMAND...` on all workers at once. JAX's own runtime
# (jax.distributed.initialize, no arguments needed on TPU VMs) connects them;
# every worker reads its own shard of the data, process 0 writes logs,
# metrics, figures and the report. The workdir and data dir must be on a
# file system all workers see (a GCS FUSE mount or an NFS share) for
# checkpoints to be shared. Preemption: SIGTERM saves a checkpoint and exits;
# re-running the same line resumes.
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- AGCG_COMMAND [ARGS...]" >&2
  exit 2
fi
NAME="$1"; ZONE="$2"; shift 3
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="${AGCG_REMOTE_DIR:-agcg-jax}"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}
echo "copying the project to every worker of $NAME"
tar -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/agcg-jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/agcg-jax.tgz "$NAME":/tmp/agcg-jax.tgz --zone "$ZONE" --worker=all
ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/agcg-jax.tgz -C ~/$REMOTE_DIR"
echo "setting up (idempotent)"
ssh_all "cd ~/$REMOTE_DIR && bash -c 'source launch/setup.sh && python -m pip install --quiet \"jax[tpu]\"'"
ARGS="$(printf '%q ' "$@")"
echo "running on all workers: agcg --distributed $ARGS"
ssh_all "cd ~/$REMOTE_DIR && AGCG_DISTRIBUTED=1 .venv/bin/agcg $ARGS"
