#!/usr/bin/env bash
# Check that training under each accelerate config in examples/accelerate_configs/ runs, keeps the
# processes' weights equal, and resumes exactly from a checkpoint (sharded ones included):
# for each config, a tiny LOOP run of 2 epochs straight, then 1 epoch + a resumed second epoch;
# the two final adapters must be equal. Uses tests/scripts/two_process_run.py (which checks the
# weights after every optimizer step and the prompt groups after every epoch).
#
#     bash benchmarks/gpu/check_engines.sh OUT                                      # on GPUs: fsdp2, zero2, zero3
#     NUM_PROCESSES=2 CONFIGS="ddp" bash benchmarks/gpu/check_engines.sh OUT         # on CPU (gloo)
#
# FSDP and DeepSpeed run through accelerate only on GPUs; one GPU (NUM_PROCESSES=1) already
# exercises their sharded state, saving and loading. DeepSpeed must be installed (docs/benchmarks.md).
set -uo pipefail
OUT="${1:?usage: check_engines.sh OUT}"
CONFIGS="${CONFIGS:-fsdp2 deepspeed_zero2 deepspeed_zero3}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$OUT"
python3 -m loop_trl.testing "$OUT/tiny-sd" >/dev/null 2>&1 || { echo "could not write the tiny pipeline"; exit 1; }
status=0
for config in $CONFIGS; do
    run() {  # run MODE FOLDER
        python3 -m accelerate.commands.launch --config_file "$ROOT/examples/accelerate_configs/$config.yaml" \
            --num_processes "$NUM_PROCESSES" --mixed_precision no --main_process_port $((29600 + RANDOM % 300)) \
            "$ROOT/tests/scripts/two_process_run.py" "$OUT/tiny-sd" "$2" "$1" >"$2.log" 2>&1
    }
    mkdir -p "$OUT/$config/straight" "$OUT/$config/resumed"
    if run full "$OUT/$config/straight" && run first "$OUT/$config/resumed" && run resume "$OUT/$config/resumed"; then
        if python3 - "$OUT/$config" <<'PY'
import json, sys, glob
import torch
from safetensors.torch import load_file
folder = sys.argv[1]
a = load_file(f"{folder}/straight/pytorch_lora_weights.safetensors")
b = load_file(f"{folder}/resumed/pytorch_lora_weights.safetensors")
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
spread = max(max(json.load(open(p))["weight_spread"] or [0.0]) for p in glob.glob(f"{folder}/*/rank_*.json"))
print(f"    adapters equal after resume: {same}; largest weight difference between processes: {spread}")
sys.exit(0 if same and spread == 0.0 else 1)
PY
        then echo "$config: ok"; else echo "$config: FAILED (see above)"; status=1; fi
    else
        echo "$config: FAILED to run (logs: $OUT/$config/*.log)"; tail -5 "$OUT/$config"/*.log; status=1
    fi
done
exit $status
