#!/usr/bin/env bash
# The GPU check (about 5 minutes on one GPU): extraction, FAISS on the GPU, targets, training and
# evaluation on a 100k-token slice of State of the Union with the offline default model, each
# compared with the same stage on the CPU, throughputs written to JSON.
#
#   bash bench/gpu_check.sh            # OUT=runs/gpu_check JSON=bench/results/gpu_check.json
#
# Needs a CUDA GPU; FAISS on the GPU needs `pip install 'mlpmem[gpu]'` (without it the GPU
# index steps are skipped and the JSON says so). torchrun runs the evaluation once more through
# the multi-process path (nccl). Exits non-zero when a GPU artefact disagrees with the CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
JSON=${JSON:-bench/results/gpu_check.json}
MODEL=${MODEL:-smollm2-135m}
TOKENS=${TOKENS:-100000}
DEV=${DEV:-cuda}  # DEV=cpu runs the same steps without a GPU (tests/test_dist.py does, on a tiny model)
K=${K:-1024}
CTX=${CTX:-512}  # windows of CTX tokens, stride CTX/2
VALID=${VALID:-5000}
TEST=${TEST:-10000}
export TQDM_DISABLE=1
rm -rf "$OUT"
t() { local name=$1; shift; local t0=$EPOCHREALTIME; "$@"; echo "$name $t0 $EPOCHREALTIME" >> "$OUT/seconds.txt"; }  # bash 5
mkdir -p "$OUT"

t corpus $MLPMEM corpus --source builtin:sotu --model "$MODEL" --out "$OUT/corpus" --train-tokens "$TOKENS" --valid-tokens "$VALID" --test-tokens "$TEST"
for dev in $(printf "cpu\n%s\n" "$DEV" | sort -u); do
  t "datastore_$dev" $MLPMEM datastore --corpus "$OUT/corpus" --out "$OUT/ds_$dev" --model "$MODEL" --device "$dev" --batch-size 32 --context "$CTX" --stride $((CTX / 2))
done
t index_cpu $MLPMEM index --datastore "$OUT/ds_cpu" --out "$OUT/ix_cpu" --kind flat
t targets_cpu $MLPMEM targets --datastore "$OUT/ds_cpu" --index "$OUT/ix_cpu" --out "$OUT/tg_cpu" --k "$K" --temperature 4
GPU_FAISS=$($PY -c "import faiss; print(int(hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0))")
if [ "$GPU_FAISS" = 1 ]; then
  t index_gpu $MLPMEM index --datastore "$OUT/ds_cpu" --out "$OUT/ix_gpu" --kind flat --device cuda
  t targets_gpu $MLPMEM targets --datastore "$OUT/ds_cpu" --index "$OUT/ix_gpu" --out "$OUT/tg_gpu" --k "$K" --temperature 4
fi
# init plain: the datastore holds the keys alone, and the check is about the device, not the start
t train_cuda $MLPMEM train --datastore "$OUT/ds_cpu" --targets "$OUT/tg_cpu" --out "$OUT/train_cuda" --device "$DEV" --epochs 2 --precision bf16 --init plain
t knnlm_cpu $MLPMEM knnlm --corpus "$OUT/corpus" --datastore "$OUT/ds_cpu" --index "$OUT/ix_cpu" --out "$OUT/knn_cpu" --device cpu --k "$K"
t knnlm_cuda $MLPMEM knnlm --corpus "$OUT/corpus" --datastore "$OUT/ds_cpu" --index "$OUT/ix_cpu" --out "$OUT/knn_cuda" --device "$DEV" --k "$K"
t knnlm_torchrun $PY -m torch.distributed.run --nproc-per-node 1 -m mlpmem knnlm --corpus "$OUT/corpus" --datastore "$OUT/ds_cpu" \
  --index "$OUT/ix_cpu" --out "$OUT/knn_torchrun" --device "$DEV" --k "$K"

$PY - "$OUT" "$JSON" "$GPU_FAISS" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np

out, path, gpu_faiss = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
dsg = "ds_cuda" if (out / "ds_cuda").exists() else "ds_cpu"  # DEV=cpu: the check of the script itself
man = lambda p: json.loads((out / p / "manifest.json").read_text())
cat = lambda p, pre: np.concatenate([np.load(f) for f in sorted((out / p).glob(f"{pre}-*.npy"))])
secs = {name: float(b) - float(a) for name, a, b in (line.split() for line in (out / "seconds.txt").read_text().splitlines())}
knn = {d: json.loads((out / f"knn_{d}" / "knnlm.json").read_text()) for d in ("cpu", "cuda", "torchrun")}
r = {
    "model": knn["cpu"]["model"], "train_tokens": man("ds_cpu")["n_rows"] + 1, "seconds": secs,
    "extract_tokens_per_s": {d: man(f"ds_{d}")["extract_tokens_per_s"] for d in ("cpu", "cuda" if (out / "ds_cuda").exists() else "cpu")},
    "datastore_values_equal": bool(np.array_equal(cat("ds_cpu", "values"), cat(dsg, "values"))),
    "datastore_keys_max_abs_diff": float(np.abs(cat("ds_cpu", "keys").astype(np.float32) - cat(dsg, "keys").astype(np.float32)).max()),
    "train_tokens_per_s_cuda": man("train_cuda")["tokens_per_s"],
    "knnlm": {d: {"ppl": k["ppl"], "tokens_per_s": k["tokens_per_s"]} for d, k in knn.items()},
    "gpu_faiss": gpu_faiss,
}
if gpu_faiss:
    r["targets_ids_equal_share_gpu_vs_cpu"] = float(np.mean(cat("tg_cpu", "ids") == cat("tg_gpu", "ids")))
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(r, indent=2) + "\n")
print(json.dumps(r, indent=2))
bad = [m for m in ("base", "knn_lm") if abs(knn["cuda"]["ppl"][m] / knn["cpu"]["ppl"][m] - 1) > 0.01]
if not r["datastore_values_equal"] or bad:
    sys.exit(f"GPU and CPU disagree: values equal {r['datastore_values_equal']}, perplexities off by >1%: {bad}")
EOF
