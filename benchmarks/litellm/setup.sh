#!/usr/bin/env bash
# Create a separate virtual environment holding LiteLLM's proxy, for benchmarks/bench_litellm.py.
# LiteLLM is not a dependency of the project: this environment is used only to run the proxy as a server.
#
# Usage: bash benchmarks/litellm/setup.sh [VENV]   (default: benchmarks/litellm/.venv, git-ignored)
#        LITELLM_VERSION=1.108.7 PYTHON=python3 bash benchmarks/litellm/setup.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv}"
version="${LITELLM_VERSION:-1.108.7}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "litellm[proxy]==$version"
"$venv/bin/python" -c 'import importlib.metadata as m; print("litellm", m.version("litellm"))'
echo "LiteLLM's proxy is installed in $venv; run: python benchmarks/bench_litellm.py --litellm-python $venv/bin/python"
