#!/usr/bin/env bash
# Run one agcg command as ONE process on THIS host, using all its GPUs, as
# part of a multi-host job. Start it on every host (by hand, ssh, or your
# scheduler), each with its own process id:
#
#   bash launch/gpu_hosts.sh --coordinator HOST0:12345 --num-processes 2 --process-id 0 -- \
#        train-gan --config configs/paper.py --workdir /shared/runs/paper
#
# The three values may also come from the environment: AGCG_COORDINATOR,
# AGCG_NUM_PROCESSES, AGCG_PROCESS_ID (Slurm: SLURM_PROCID / SLURM_NTASKS are
# used when the flags and variables are absent). The coordinator is host 0's
# address and a free port. Data parallel over every GPU of every host; the
# global batch is batch_per_device x all GPUs. Process 0 writes logs and
# reports; the workdir must be on a file system every host sees.
set -euo pipefail
COORD="${AGCG_COORDINATOR:-}"
NUM="${AGCG_NUM_PROCESSES:-${SLURM_NTASKS:-}}"
PID_="${AGCG_PROCESS_ID:-${SLURM_PROCID:-}}"
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2 ;;
    --num-processes) NUM="$2"; shift 2 ;;
    --process-id) PID_="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "gpu_hosts.sh: unknown option $1 (expected --coordinator/--num-processes/--process-id -- COMMAND)" >&2; exit 2 ;;
  esac
done
if [ -z "$COORD" ] || [ -z "$NUM" ] || [ -z "$PID_" ] || [ $# -eq 0 ]; then
  echo "usage: $0 --coordinator HOST:PORT --num-processes N --process-id I -- AGCG_COMMAND [ARGS...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
source launch/setup.sh
export AGCG_DISTRIBUTED=1 AGCG_COORDINATOR="$COORD" AGCG_NUM_PROCESSES="$NUM" AGCG_PROCESS_ID="$PID_"
exec agcg "$@"
