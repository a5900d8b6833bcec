#!/usr/bin/env bash
# GPU suite (issue 13, item 6): the real 8B shape, float32, full depth, on one GPU, in about 10 minutes.
#
# What it does: builds a random-weight llama-3.1-8b (instab_core.zoo.shapes; ~30 GiB of float32 safetensors in
# $WORK), measures exp12's boundary kernel in process (1000 rays; kernel rows/s against pure-forward rows/s of the
# same rows; prefix_cache beside it; the batch-invariance audit; peak GPU memory), then runs the notebooks exp02
# (top-k), exp12 (1000 rays), exp10 (invariance table), exp04 (question 1, 200 tokens) and fisher (one layer) with
# `-p device cuda` into $WORK, and writes the figures with the GPU's name into benchmarks/gpu.md ($MD).
# Notebooks are executed into $WORK/notebooks and their results into $WORK/results: nothing is written into the
# checkout's book/experiments/, results/ or _build/ (the driver calls instab_core.book.run_notebook with out_dir and
# results_root; `instab run` has no out_dir option and would write book/experiments/).
#
# How to run it
#   On a GPU workstation with network:   make setup && benchmarks/gpu_suite.sh
#   On a GPU machine without network (e.g. this workplace's H200 through the device tool):
#     1. here, where pip reaches the registry, once:  benchmarks/gpu_wheels.sh      (wheels into .whl/, ignored)
#     2. there: carry [".whl"] and run                bash benchmarks/gpu_suite.sh
#        The script installs .whl/*.whl into /tmp/site (no index, no deps) and uses the machine's python3 (its torch).
#   On the CPU (a rehearsal that tests the script; minutes on 2 cores):
#     DEVICE=cpu SHAPE=llama-3.2-1b LAYERS=1 RAYS=16 STEPS=8 WORK=/tmp/gpu-suite MD=/tmp/gpu-suite/gpu.md \
#         benchmarks/gpu_suite.sh
#
# Variables (defaults): DEVICE=cuda SHAPE=llama-3.1-8b LAYERS=0 (0 = full depth) RAYS=1000 STEPS=200 BATCH=64
#   FISHER_LAYER=1/2 WORK=$(mktemp -d) MD=benchmarks/gpu.md MODEL= (an existing model dir: skip the build)
#   SKIP= (comma list of kernel,exp02,exp12,exp10,exp04,fisher) PY= (python; default .venv/bin/python, else python3)
# Disk: the 8B float32 model needs ~32 GB in $WORK; memory: ~32 GB host RAM while loading, ~32-40 GB of GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-llama-3.1-8b}
LAYERS=${LAYERS:-0}
RAYS=${RAYS:-1000}
STEPS=${STEPS:-200}
BATCH=${BATCH:-64}
FISHER_LAYER=${FISHER_LAYER:-1/2}
WORK=${WORK:-$(mktemp -d /tmp/instab-gpu-suite.XXXXXX)}
MD=${MD:-benchmarks/gpu.md}
SKIP=${SKIP:-}

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # No network there: the carried wheels (benchmarks/gpu_wheels.sh), the machine's own torch.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
  PY=python3
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# papermill's kernel must import the same packages: register a kernelspec for this python if there is none.
if ! "$PY" -c "import jupyter_client.kernelspec as k; k.get_kernel_spec('python3')" >/dev/null 2>&1; then
  "$PY" -m ipykernel install --user --name python3 >/dev/null
fi

echo "gpu_suite: device=$DEVICE shape=$SHAPE layers=$LAYERS rays=$RAYS steps=$STEPS work=$WORK md=$MD py=$PY"
[ "$DEVICE" = cpu ] || nvidia-smi -L || { echo "gpu_suite: nvidia-smi failed; for a CPU rehearsal set DEVICE=cpu" >&2; exit 1; }

args=(--shape "$SHAPE" --layers "$LAYERS" --device "$DEVICE" --rays "$RAYS" --steps "$STEPS" --batch "$BATCH"
      --fisher-layer "$FISHER_LAYER" --work "$WORK" --md "$MD" --skip "$SKIP")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
"$PY" benchmarks/gpu_suite.py "${args[@]}"
echo "gpu_suite: done; report in $MD; scratch in $WORK (delete it: ~32 GB for the 8B model)"
