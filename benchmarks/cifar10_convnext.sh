#!/usr/bin/env bash
# A non-ResNet family on real data: ConvNeXt-atto (timm's plain name, made stimulative in place) on
# the CIFAR-10 subset of benchmarks/cifar10.py (500 train images per class, 100 held out, test split
# read once at the end), baseline vs ST++, 30 epochs, seeds 0 and 1; then the loafing panel.
#   bash benchmarks/cifar10_convnext.sh CIFAR10_DIR WORK_DIR        (resumable: finished runs are skipped)
# ConvNeXt's unpadded stride-2 downsampling needs sides that are multiples of 32 px at patch 2, so
# ST++ runs without small inputs here (--stim-small-input 1.0): KL-, the stpp rule and k=1 remain.
set -euo pipefail
data_src=${1:?CIFAR-10 folder (ImageFolder: train/, test/)}; work=${2:?work folder}
repo=$(cd "$(dirname "$0")/.." && pwd); py=${PYTHON:-python}
data=$($py -c "import sys; sys.path.insert(0, '$repo/benchmarks'); import cifar10; print(cifar10.prepare_data('$data_src', '$work', 500, 100))")
common=("$data" --train-split train --val-split holdout --model convnext_atto --model-kwargs patch_size=2
        --num-classes 10 --img-size 32 -b 64 --validation-batch-size 500 --opt adamw --lr 2e-3 --weight-decay 0.05
        --sched cosine --warmup-epochs 1 --scale 0.64 1.0 --ratio 0.9 1.11 --hflip 0.5 --color-jitter 0
        --smoothing 0 --crop-pct 1.0 --interpolation bilinear --train-interpolation bilinear --stim-eval-subnets 0
        -j 1 --log-interval 1000 --epochs 30 --output "$work/runs")
run() {  # name, flags...: skip a finished run, resume an interrupted one
    local name=$1; shift
    [ "$(grep -c . "$work/runs/$name/summary.csv" 2>/dev/null || echo 0)" -gt 30 ] && return
    local resume=(); [ -f "$work/runs/$name/last.pth.tar" ] && resume=(--resume "$work/runs/$name/last.pth.tar")
    OMP_NUM_THREADS=1 $py "$repo/train_stim.py" "${common[@]}" --experiment "$name" "${resume[@]}" "$@" \
        >> "$work/$name.log" 2>&1
}
for seed in 0 1; do
    run "baseline-s$seed" --seed "$seed" & run "stpp-s$seed" --seed "$seed" --stim-pp --stim-small-input 1.0 & wait
    $py -m stim_timm.cli.analyze "$work/runs/baseline-s$seed" "$work/runs/stpp-s$seed" --data-dir "$data" --split test \
        --subnets 12 --labels baseline ST++ --out "$work/analyze_s$seed" -b 250 -j 1 --no-progress \
        --title "ConvNeXt-atto (patch 2) on CIFAR-10, 30 epochs, seed $seed"
done
