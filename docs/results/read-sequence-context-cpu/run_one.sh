#!/bin/bash
# one.sh TASK SEED : READ + sequence context, the docs/results/glue-minilm-cpu protocol (500 rows, 3 epochs, batch 16, len 128)
. /work/main/.venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
out=/tmp/q9ctx/$1-s$2
python -m readapt train --task $1 --data-dir /work/shared/data/glue --max-train-samples 500 --epochs 3 --batch-size 16 --max-length 128 --seed $2 --method-option sequence_context=mean --output-dir $out --overwrite --no-progress --no-checkpoints > $out.log 2>&1
python -c "import json;m=json.load(open('$out/metrics.json'));print('$1 $2', round(100*m['best_score'],2), [round(100*e['score'],1) for e in m['epochs']], round(m['train_cpu_seconds']))"
