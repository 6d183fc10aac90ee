#!/usr/bin/env bash
# Create or reuse the project's virtual environment in <repo>/.venv.
#
# Sourced by run_train.sh and run_tests.sh; also runnable alone.
# Idempotent: a stamp in .venv records what was installed (the lock file,
# pyproject.toml, and whether this host has an NVIDIA GPU); when it matches,
# nothing is installed again.
#
# torch: on a host without an NVIDIA GPU we install the CPU build, never the
# multi-GB CUDA one. pip finds a local CPU wheel when the machine provides one
# (find-links); elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# On GPU hosts torch comes from PyPI (CUDA build) unless TORCH_INDEX_URL says
# otherwise.
#
# Environment: PYTHON (interpreter to build the venv with, default python3),
# TORCH_INDEX_URL (extra index for torch), EXT_SKIP_SETUP=1 (use .venv as is).

ext_setup_env() {
    local root venv py stamp want have torch_spec accel
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    EXT_PYTHON="$venv/bin/python"
    if [[ "${EXT_SKIP_SETUP:-0}" == "1" && -x "$EXT_PYTHON" ]]; then
        return 0
    fi

    accel=cpu
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        accel=cuda
    fi
    want="$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)-$accel"
    have="$(cat "$venv/.ext-setup-stamp" 2>/dev/null || true)"
    if [[ -x "$EXT_PYTHON" && "$want" == "$have" ]]; then
        return 0
    fi

    py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "setup: need Python >= 3.11; set PYTHON=/path/to/python3.11 (got: $("$py" --version 2>&1))" >&2
        return 1
    fi
    echo "setup: preparing $venv ($accel host); this happens once and takes a few minutes" >&2
    if [[ ! -x "$EXT_PYTHON" ]]; then
        echo "setup: [1/3] creating the virtual environment" >&2
        "$py" -m venv "$venv" || return 1
    fi
    local pip=("$EXT_PYTHON" -m pip install --quiet --disable-pip-version-check)
    torch_spec="$(grep -E '^torch==' "$root/requirements.lock")"
    local index_args=()
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        index_args=(--extra-index-url "$TORCH_INDEX_URL")
    fi
    # A CPU build left from an earlier CPU-only setup must not survive on a GPU host.
    if [[ "$accel" == "cuda" ]] && "$EXT_PYTHON" -c 'import torch,sys; sys.exit("+cpu" not in torch.__version__)' 2>/dev/null; then
        "$EXT_PYTHON" -m pip uninstall --quiet --yes torch || return 1
    fi
    echo "setup: [2/3] installing $torch_spec ($accel build; the largest download)" >&2
    "${pip[@]}" "${index_args[@]}" "$torch_spec" || return 1
    echo "setup: [3/3] installing torchtitan and the other dependencies pinned in requirements.lock" >&2
    "${pip[@]}" "${index_args[@]}" -c "$root/requirements.lock" -e "$root[dev]" || return 1
    echo "$want" >"$venv/.ext-setup-stamp"
    echo "setup: done ($("$EXT_PYTHON" -c 'import torch, torchtitan; print("torch", torch.__version__, "torchtitan", torchtitan.__version__)'))" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    ext_setup_env
fi
