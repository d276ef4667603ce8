#!/usr/bin/env bash
# The GPU benchmarks in one go (a lent GPU machine is held for minutes, not hours):
#   1. train-step time versatile/dense on the GPU (alone, so the timing is clean);
#   2. side by side: the full CIFAR-10 table (benchmarks/cifar10.py, 8 settings, 15 epochs, 50k images)
#      and the mask-rule comparison at the same budget (benchmarks/mask_learning.py).
# Usage: benchmarks/gpu_session.sh DATA_DIR MODELS_DIR OUT_DIR [WHEELS_DIR] [PART]
#   DATA_DIR holds cifar10-{train,test}.tar.gz (../shared/data/cifar10), MODELS_DIR resnet20_cifar10.pt.
#   PART "all" (default) runs the above; "followup" runs what the first session (2026-11-27) lost to
#   a bug (the flip rules, fixed since) and a second seed of learned s=2 and s=4.
#   PART "recipes" runs benchmarks/finetune_recipes.py (s=2 fine-tuning recipes and both fits, 3 seeds;
#   frozen vs project masks side by side from fit-plain).
#   PART "baselines" trains the project's own ResNet-20 and ResNet-56 side by side
#   (benchmarks/train_baseline.py, up to 200 epochs, fewer where the first epoch says they would not
#   fit in BENCH_SECONDS - 60) into ~/.cache/vconvert/baselines on the device; PART "own-table" then
#   runs the table on them (a second call on the same warm machine: the models are never committed,
#   so they must not outlive it). Not yet run on a GPU: the measured dense step (11 ms at batch 256
#   on an H200, train_step_cuda.json) gives about 2.2 s per ResNet-20 epoch.
set -u
data=$1 models=$2 out=$3 wheels=${4:-} part=${5:-all}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
if [ -n "$wheels" ]; then  # packages the machine lacks (torch-pruning), installed without a network
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cache=$HOME/.cache/vconvert/cifar10
mkdir -p "$cache" "$out"
python3 -c "from pathlib import Path; from benchmarks.common import unpack; unpack(Path('$data'), Path('$cache'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, onnxruntime; print(torch.__version__, torchvision.__version__, onnxruntime.__version__)"

budget=${BENCH_SECONDS:-440}
if [ "$part" = all ]; then
  timeout 90 python3 benchmarks/train_step.py --device cuda --batch 256 --rounds 20 \
    && cp benchmarks/results/train_step_cuda.json "$out/"
  timeout "$budget" python3 benchmarks/cifar10.py --jobs 8 --batch-size 256 --lr 0.02 --models "$models" \
    --shared-data "$data" --cifar "$cache" --latency-seconds 1 --output "$out/cifar10" > "$out/cifar10.log" 2>&1 &
  rules="frozen,tpami,tpami + ortho,flip,flip + ortho"  # the 2026-11-27 run also had "frozen + ortho" (= frozen)
  timeout "$budget" python3 benchmarks/mask_learning.py --epochs 15 --train-limit 0 --jobs 6 --batch-size 256 \
    --lr 0.02 --models "$models" --cifar "$cache" --output "$out/mask_learning_gpu" \
    --rules "$rules" > "$out/mask_learning.log" 2>&1 &
elif [ "$part" = baselines ]; then
  for arch in resnet20 resnet56; do
    timeout "$budget" python3 benchmarks/train_baseline.py --arch $arch --epochs 200 --seconds $((budget - 60)) \
      --batch-size 256 --lr 0.1 --cifar "$cache" --results "$out/baseline_$arch.json" > "$out/$arch.log" 2>&1 &
  done
elif [ "$part" = own-table ]; then
  own=$HOME/.cache/vconvert/baselines
  timeout "$budget" python3 benchmarks/cifar10.py --jobs 8 --batch-size 256 --lr 0.02 --models "$models" \
    --base "$own/resnet20_cifar10.pt" --arch resnet20 --cifar "$cache" --latency-seconds 1 \
    --output "$out/cifar10_own_resnet20" > "$out/cifar10.log" 2>&1 &
  timeout "$budget" python3 benchmarks/cifar10.py --jobs 4 --batch-size 256 --lr 0.02 --models "$models" \
    --base "$own/resnet56_cifar10.pt" --arch resnet56 --cifar "$cache" --latency-seconds 1 \
    --settings "learned s=2,learned s=4,target-ratio 2,torch-pruning @ target-ratio 2" \
    --output "$out/cifar10_own_resnet56" > "$out/cifar10_resnet56.log" 2>&1 &
elif [ "$part" = recipes ]; then  # fine-tuning recipes for s=2 from both fits, three seeds of the default
  timeout "$budget" python3 benchmarks/finetune_recipes.py --jobs 7 --seeds 0,1,2 --models "$models" \
    --cifar "$cache" --recipes "default,features 1.0,EMA 0.999" --output "$out/finetune_recipes_gpu" \
    > "$out/recipes.log" 2>&1 &
  timeout "$budget" python3 benchmarks/finetune_recipes.py --jobs 6 --seeds 0,1,2 --init fit-plain \
    --models "$models" --cifar "$cache" --recipes "default,project masks" \
    --output "$out/finetune_recipes_gpu_fit_plain" \
    > "$out/recipes_fit_plain.log" 2>&1 &
else
  timeout "$budget" python3 benchmarks/cifar10.py --jobs 2 --batch-size 256 --lr 0.02 --seed 1 --models "$models" \
    --shared-data "$data" --cifar "$cache" --latency-seconds 1 --output "$out/cifar10_seed1" \
    --settings "learned s=2,learned s=4" > "$out/cifar10.log" 2>&1 &
  timeout "$budget" python3 benchmarks/mask_learning.py --epochs 15 --train-limit 0 --jobs 2 --batch-size 256 \
    --lr 0.02 --models "$models" --cifar "$cache" --output "$out/mask_learning_gpu_flip" \
    --rules "flip,flip + ortho" > "$out/mask_learning.log" 2>&1 &
fi
while [ -n "$(jobs -r)" ]; do  # a heartbeat, so a stalled run shows where it was
  sleep 10
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  tail -q -n 1 "$out"/*.log 2>/dev/null | cut -c1-200
done
wait
echo "done"
