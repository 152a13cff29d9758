#!/usr/bin/env bash
# What each recovery lever gives, measured at the pipeline's settings (SLW: 16,384 calibration
# tokens, 50 Adam steps per layer; SFT: 40 steps of 2 x 256 tokens = 20k tokens, peak lr 1e-4,
# recovery factors only, distillation from the original unless said otherwise); writes
# experiments/results/recovery_levers.md and experiments/results/recovery_levers.png. Each step is skipped when its output
# model exists; the steps run here took about 1.5 hours on 2 busy CPU cores.
# Needs the pipeline's models (./scripts/run.sh) and baselines.sh's models/baseline-mlp-prune.
#   experiments/archive/recovery_levers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
sharp_setup
orig=models/smollm2-135m-instruct
slw=(--stage slw --model "$orig" --tokens 16384 --slw-steps 50)
sft=(--stage sft --steps 40 --batch-size 2 --seq-len 256 --eval-every 20 --save-every 20 --eval-windows 8 --max-train-tokens 100000)
train() {  # train OUT ARGS...: python -m sharp_mlx.train ARGS --out OUT, unless OUT exists
    local out=$1; shift
    [ -d "$out" ] && { echo "[skip] $out exists"; return 0; }
    echo "[run] python -m sharp_mlx.train $* --out $out"
    python -m sharp_mlx.train "$@" --out "$out"
}
start=$(date +%s)

# 1. SFT only (no SLW): the default targets (12, 14, ..., 28 <- the layer before; rank 64) with
#    fresh factors (b = 0: direct sharing at step 0), then the pipeline's SFT.
train models/exp-sftonly-init "${slw[@]}" --share next --layers 11:29 --rank 64 --no-slw
train models/exp-sftonly "${sft[@]}" --model models/exp-sftonly-init --teacher "$orig" --run-dir runs/exp-sftonly

# 2. Next-token loss instead of distillation, from the pipeline's SLW checkpoint.
train models/exp-sharp-sft-ce "${sft[@]}" --model models/smollm2-135m-instruct-sharp-slw --loss ce --run-dir runs/exp-sharp-sft-ce

# 3. MLP pruning and layer pruning at the same targets, fine-tuned with LoRA of a matched budget:
#    SHARP trains 9 x 3 x (576 + 1536) x 64 = 3,649,536 recovery parameters. LoRA covers every
#    linear layer of the last 18 blocks (12..29, as SHARP's targets span): rank 29 on the
#    MLP-pruned model (9 blocks with attention + MLP, 9 with attention only: 126,144 per rank ->
#    3,658,176), rank 40 on the layer-pruned one (the 9 blocks after layer 11: 91,584 per rank ->
#    3,663,360). SFT prints the trainable count.
train models/exp-layer-prune "${slw[@]}" --share next --layers 11:29 --rank 64 --baseline layer-prune
train models/exp-mlp-prune-lora-sft "${sft[@]}" --model models/baseline-mlp-prune --teacher "$orig" --lora-rank 29 \
    --lora-layers 18 --run-dir runs/exp-mlp-prune-lora-sft || echo "error: MLP pruning + LoRA SFT failed (see above)"
train models/exp-layer-prune-lora-sft "${sft[@]}" --model models/exp-layer-prune --teacher "$orig" --lora-rank 40 \
    --lora-layers 9 --run-dir runs/exp-layer-prune-lora-sft || echo "error: layer pruning + LoRA SFT failed (see above)"

# 4. ~50% of stored MLP parameters. `--share auto --cut 0.5 --rank 64` cannot reach it (with
#    references adjacent to their targets auto stops at 13 targets, -36.7%), so next:2 over 2:29:
#    references 2, 5, ..., 26 each serve the two layers after them, 18 targets (3..28, layer 29
#    kept), rank 64: stored MLP -50.8% (recovery included), all params -30.1%. SHARP and the
#    control (no borrowed weights) through the same SLW and SFT.
train models/exp-50-sharp-slw "${slw[@]}" --share next:2 --layers 2:29 --rank 64
train models/exp-50-sharp "${sft[@]}" --model models/exp-50-sharp-slw --teacher "$orig" --run-dir runs/exp-50-sharp

# 6. More SFT tokens: the pipeline's SFT from its SLW checkpoint, 80 steps (40k tokens, 2x) instead of 40.
train models/exp-sharp-sft80 "${sft[@]}" --steps 80 --model models/smollm2-135m-instruct-sharp-slw --teacher "$orig" --run-dir runs/exp-sharp-sft80

# 7. The ~65% setting: next:3 over 1:29 at rank 32: references 1, 5, ..., 25 each serve the three
#    layers after them, 21 targets, layer 29 kept: stored MLP -64.7% recovery included, all params
#    -38.3% (next:2 cannot reach 65% at rank 64 without sharing layer 29; 0:29 gives -53.7%).
train models/exp-65-sharp-slw "${slw[@]}" --share next:3 --layers 1:29 --rank 32
train models/exp-65-sharp "${sft[@]}" --model models/exp-65-sharp-slw --teacher "$orig" --run-dir runs/exp-65-sharp

# 8. Rank allocation: the default targets and total rank (9 x 64), split by how much the loss on
#    calibration text rises when each target's MLP alone is removed.
train models/exp-rankalloc-slw "${slw[@]}" --share next --layers 11:29 --rank 64 --rank-allocation sensitivity
train models/exp-rankalloc "${sft[@]}" --model models/exp-rankalloc-slw --teacher "$orig" --run-dir runs/exp-rankalloc

# 9. Reference choice: `auto` at the default cut (25%) over every layer, references anywhere earlier
#    (the all-pairs analysis: python -m sharp_mlx.analyze --all-pairs --tokens 1280 --out runs/analyze-all).
[ -f runs/analyze-all/analysis.json ] || python -m sharp_mlx.analyze --all-pairs --tokens 1280 --seq-len 256 --out runs/analyze-all
train models/exp-auto-any-slw "${slw[@]}" --share auto --cut 0.25 --layers 0:30 --references any --analysis runs/analyze-all/analysis.json --rank 64
train models/exp-auto-any "${sft[@]}" --model models/exp-auto-any-slw --teacher "$orig" --run-dir runs/exp-auto-any

# Not run (time; each is 20-35 min on 2 busy cores): the control at the ~50% targets and 3x the SFT
# tokens (120 steps). Uncomment to run them.
# train models/exp-50-lowrank-slw "${slw[@]}" --share next:2 --layers 2:29 --rank 64 --baseline lowrank
# train models/exp-50-lowrank "${sft[@]}" --model models/exp-50-lowrank-slw --teacher "$orig" --run-dir runs/exp-50-lowrank
# train models/exp-sharp-sft120 "${sft[@]}" --steps 120 --model models/smollm2-135m-instruct-sharp-slw --teacher "$orig" --run-dir runs/exp-sharp-sft120

# Evaluate everything that exists (a step above may have failed), as everywhere: 8 windows of 256.
models=("$orig" models/smollm2-135m-instruct-sharp-slw models/smollm2-135m-instruct-sharp models/exp-sharp-sft-ce
    models/exp-sftonly-init models/exp-sftonly models/baseline-lowrank-sft models/baseline-mlp-prune models/exp-mlp-prune-lora-sft
    models/exp-layer-prune models/exp-layer-prune-lora-sft models/exp-50-sharp-slw models/exp-50-sharp models/exp-sharp-sft80 models/exp-50-lowrank-slw
    models/exp-50-lowrank models/exp-65-sharp-slw models/exp-65-sharp models/exp-sharp-sft120
    models/exp-rankalloc-slw models/exp-rankalloc models/exp-auto-any-slw models/exp-auto-any)
present=(); for m in "${models[@]}"; do [ -d "$m" ] && present+=("$m"); done
mkdir -p runs/exp-recovery-levers
python -m sharp_mlx.evaluate --model "${present[@]}" --data data/*/test.jsonl --seq-len 256 --max-windows 8 --json \
    --plot experiments/results/recovery_levers.png > runs/exp-recovery-levers/perplexity.json
python - "$orig" "$(( ($(date +%s) - start) / 60 ))" "${present[@]}" > experiments/results/recovery_levers.md <<'EOF'
import json, sys
from pathlib import Path
from sharp_mlx import sharemap
orig, minutes, models = sys.argv[1], sys.argv[2], sys.argv[3:]
ppl = json.loads(Path("runs/exp-recovery-levers/perplexity.json").read_text())
files = list(ppl[orig])
doms = [Path(f).parent.name for f in files]
base = json.loads((Path(orig) / "config.json").read_text())
print("# Recovery levers on SmolLM2-135M, each measured\n")
print(f"`experiments/archive/recovery_levers.sh` (this invocation: {minutes} min; Linux x86_64, 2 cores shared with other jobs, MLX CPU + OpenBLAS, float32).")
print("Test perplexity on 8 windows of 256 tokens per domain (2,048 scored tokens each); `x orig` is the")
print("geometric mean over the five domains of the ratio to the original, `max x` the worst domain's ratio.\n")
print("| model | " + " | ".join(doms) + " | x orig (geo) | max x |")
print("|---" * (len(doms) + 3) + "|")
for m in models:
    if m not in ppl:
        continue
    r = [ppl[m][f]["ppl"] / ppl[orig][f]["ppl"] for f in files]
    geo = 1.0
    for x in r:
        geo *= x
    print(f"| {Path(m).name} | " + " | ".join(f"{ppl[m][f]['ppl']:,.2f}" for f in files) + f" | {geo ** (1 / len(r)):.2f} | {max(r):.2f} |")
import mlx.core as mx
def params(p, only=None):
    return sum(v.size for f in Path(p).glob("*.safetensors") for k, v in mx.load(str(f)).items() if only is None or only in k)
n_orig = params(orig)
print("\n## Runs: stages, wall time, parameters\n")
print("| model | stages (wall s) | params stored | recovery params (what SFT trains) | savings (stored MLP incl. recovery; all params) |")
print("|---|---|---|---|---|")
for m in models:
    p = Path(m)
    cfg = json.loads((p / "config.json").read_text())
    hist = json.loads((p / "training.json").read_text()) if (p / "training.json").exists() else []
    stages = ", ".join(f"{h['stage']}" + (f"[{h.get('baseline')}]" if h.get("baseline") not in (None, "sharp") else "")
                       + (f"[{h['config']['loss']}, {h['summary']['tokens']} tok" + (f", lora {h['config']['lora_rank']}" if h['config'].get('lora_rank') else "") + "]" if h["stage"] == "sft" else "")
                       + f" {h.get('wall_s', '?')}" for h in hist) or "-"
    n, rec = params(p), params(p, ".recovery.")
    share = {int(t): r for t, r in ((cfg.get("sharp") or {}).get("share") or {}).items()}
    if share:
        line = sharemap.savings_line(base, share, cfg["sharp"].get("rank", 0))
    elif cfg.get("pruned_layers"):
        line = f"{len(cfg['pruned_layers'])} of {base['num_hidden_layers']} layers removed: all params -{1 - n / n_orig:.1%}"
    else:
        line = "-"
    print(f"| {p.name} | {stages} | {n:,} | {rec:,} | {line} |")
EOF
cat experiments/results/recovery_levers.md
