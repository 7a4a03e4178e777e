#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu/run.py needs on a GPU machine without internet
# whose Python (3.12) already has torch, transformers 5, accelerate, peft and safetensors:
#   DEST/loop: diffusers for loop-trl (loop-trl itself runs from src/ through PYTHONPATH)
#   DEST/trl:  TRL 0.23.1's stack for the anchor (transformers < 5 and what goes with it), installed
#              into its own --target folder so that it never mixes with loop-trl's
#   DEST/ds:   DeepSpeed (for check_engines.sh; PyPI has only its source, so the wheel is built
#              here, pure Python, its CUDA ops compiled on first use there) and its missing needs
#     bash benchmarks/gpu/fetch_wheels.sh [DEST]        # default DEST: .whl (git-ignored)
# docs/benchmarks.md ("GPU") has the command that installs and runs them there.
set -euo pipefail
DEST="${1:-.whl}"
get() {
    local folder="$1"; shift
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST/$folder" "$@"
}
get loop "diffusers==0.42.1" "importlib_metadata<9"
get trl "trl==0.23.1" "transformers==4.57.6" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0" "diffusers==0.35.2" \
    "datasets>=3,<4.5" "dill>=0.3,<0.4.1" "multiprocess<0.70.19" "importlib_metadata<9"
DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST/ds" "deepspeed==0.19.8"
get ds hjson "pydantic==2.14.4" "pydantic-core==2.50.5" annotated-types typing-inspection "typing-extensions>=4.16"
du -sh "$DEST/loop" "$DEST/trl" "$DEST/ds"
