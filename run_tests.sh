#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$root/scripts/setup_env.sh"
ext_setup_env
cd "$root"
exec "$EXT_PYTHON" -m pytest "$@"
