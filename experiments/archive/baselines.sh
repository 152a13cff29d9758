#!/usr/bin/env bash
# Baselines at the default pipeline's targets (next over 11:29, rank 64), next to SHARP after SLW
# and after SLW + SFT; writes experiments/results/baselines.md. Needs the pipeline's models (./scripts/run.sh).
#   experiments/archive/baselines.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
sharp_setup
orig=models/smollm2-135m-instruct
common=(--stage slw --model "$orig" --share next --layers 11:29 --rank 64 --tokens 16384 --slw-steps 50)
start=$(date +%s)
for b in direct mlp-prune lowrank; do
    [ -d "models/baseline-$b" ] || python -m sharp_mlx.train "${common[@]}" --baseline "$b" --out "models/baseline-$b"
done
# The control through the same SFT as the pipeline's SHARP model.
[ -d models/baseline-lowrank-sft ] || python -m sharp_mlx.train --run-dir runs/baseline-lowrank-sft --stage sft \
    --model models/baseline-lowrank --teacher "$orig" --out models/baseline-lowrank-sft --steps 40 --batch-size 2 \
    --seq-len 256 --eval-every 20 --save-every 20 --eval-windows 8 --max-train-tokens 100000
python -m sharp_mlx.evaluate --model "$orig" models/baseline-direct models/baseline-mlp-prune \
    models/baseline-lowrank models/baseline-lowrank-sft models/smollm2-135m-instruct-sharp-slw models/smollm2-135m-instruct-sharp \
    --data data/*/test.jsonl --seq-len 256 --max-windows 8 --plot experiments/results/baselines.png > /tmp/baselines.table
{
    echo "# Baselines at the default targets (12, 14, ..., 28; rank 64)"
    echo
    echo "\`experiments/archive/baselines.sh\` ($(( ($(date +%s) - start) / 60 )) min; Linux x86_64, 2 cores)."
    echo "direct: borrow the reference MLP, no recovery. mlp-prune: no MLP at the targets."
    echo "lowrank: the control, rank-64 factors with no borrowed weights, through the same SLW."
    echo "SHARP rows: the pipeline's checkpoints (after SLW; after SLW + 20k tokens of SFT)."
    echo
    cat /tmp/baselines.table
} > experiments/results/baselines.md
cat experiments/results/baselines.md
