#!/usr/bin/env bash
# Train with torchtitan + this extension under torchrun. See --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./run_train.sh --job.config_file train_configs/<name>.toml [--section.key value ...]

Sets up (or reuses) the virtual environment in .venv, checks the config
(python -m ext.cli check: every problem on one line each, exit 2, nothing
started), then runs
  python -m ext.launch ... -m ext.train <your arguments>
and prints that command first (ext.launch is torchrun with a shorter
failure report: torchrun's summary without its own traceback, and the
failed rank's exit code). Every argument is passed to the trainer
(torchtitan's --section.key options plus our sections); run from the
repository root so the shipped configs' relative paths resolve.

Devices (environment variables):
  NGPU         processes per node on a GPU host (default: every visible GPU)
  NPROC        processes on a CPU-only host (default 1; NPROC=2 for a 2-process
               gloo run, which exercises DDP/FSDP without a GPU)
  NNODES       number of nodes (default 1)
  NODE_RANK    this node's rank, 0..NNODES-1 (default 0)
  MASTER_ADDR  address of node 0 (default localhost; needed when NNODES > 1)
  MASTER_PORT  rendezvous port on node 0 (default 29500; single-node runs
               without it pick a free port)
  LOG_RANK     local ranks whose output is shown (default 0; e.g. 0,1)

Set-up:
  PYTHON            interpreter used to create .venv (default python3, >= 3.11)
  TORCH_INDEX_URL   extra package index for torch (e.g. the CPU wheel index)
  EXT_SKIP_SETUP=1  use .venv as it is
  EXT_SKIP_PREFLIGHT=1  skip the config check (saves ~5 s per launch, e.g. when
                    a job array re-launches a config already checked; bad
                    settings then fail inside the trainer instead)

Examples:
  ./run_train.sh --job.config_file train_configs/debug.toml
  NPROC=2 ./run_train.sh --job.config_file train_configs/debug.toml --training.steps 20
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./run_train.sh --job.config_file train_configs/x.toml

Trainer options (torchtitan's sections and ours, e.g. [data], [sft], [eval]):
  ./run_train.sh --trainer-help                      every option, its default
  ./run_train.sh --job.config_file X.toml --help     the same, defaults from X.toml
Option names take underscores or hyphens (--job.config_file = --job.config-file).
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi

# shellcheck source=scripts/setup_env.sh
source "$root/scripts/setup_env.sh"
ext_setup_env

# Every trainer option (torchtitan's sections and ours), with a config's values
# as the defaults when one is given: --trainer-help anywhere, or --help/-h
# after other arguments.
trainer_args=()
trainer_help=0
for arg in "$@"; do
    case "$arg" in
        --trainer-help|--help|-h) trainer_help=1 ;;
        *) trainer_args+=("$arg") ;;
    esac
done
if [[ "$trainer_help" == 1 ]]; then
    exec "$EXT_PYTHON" -m ext.train ${trainer_args[@]+"${trainer_args[@]}"} --help
fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if [[ "$gpus" -gt 0 ]]; then
    nproc="${NGPU:-$gpus}"
else
    nproc="${NPROC:-1}"
fi
nnodes="${NNODES:-1}"

launch=(--nnodes="$nnodes" --nproc_per_node="$nproc")
if [[ "$nnodes" -gt 1 ]]; then
    launch+=(--node_rank="${NODE_RANK:-0}" --rdzv_backend=c10d
             --rdzv_endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
    launch+=(--master_addr="${MASTER_ADDR:-localhost}" --master_port="$MASTER_PORT")
else
    launch+=(--standalone)
fi

# Preflight: every problem of the config, one line each, before anything starts.
if [[ "${EXT_SKIP_PREFLIGHT:-0}" != 1 ]] && ! WORLD_SIZE=$((nproc * nnodes)) LOCAL_WORLD_SIZE="$nproc" "$EXT_PYTHON" -m ext.cli check "$@"; then
    exit 2
fi

# On SIGTERM/SIGUSR1 the launcher (ext.launch) passes the signal on to the ranks,
# which finish their step and save a checkpoint ([preemption]); it waits this
# long for them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"

cmd=("$EXT_PYTHON" -m ext.launch "${launch[@]}"
     --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3
     -m ext.train "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
