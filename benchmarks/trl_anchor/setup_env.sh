#!/usr/bin/env bash
# Create the virtual environment of the anchor: TRL 0.23.1, the last release with DDPOTrainer,
# which needs transformers < 5. It lives apart from loop-trl's environment.
#
#     bash benchmarks/trl_anchor/setup_env.sh [VENV_DIR]     # default: benchmarks/.venv-trl
#
# The anchor imports the shapes testbed (model folder, verifier, prompts) from this checkout's
# src/ through PYTHONPATH, so nothing of loop-trl is installed into it.
set -euo pipefail
VENV="${1:-$(dirname "$0")/../.venv-trl}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0"
"$VENV/bin/pip" install --quiet "trl[diffusers]==0.23.1" "transformers<5" peft numpy pillow
"$VENV/bin/python" -c "import trl, transformers, diffusers, peft, torch; print('anchor env:', 'trl', trl.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
