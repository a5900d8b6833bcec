#!/usr/bin/env bash
# Wheels that benchmarks/gpu_suite.sh needs on a GPU machine without network (this workplace's H200 image has
# torch, numpy, pandas, scipy, safetensors, huggingface-hub, tqdm, pyyaml, jinja2, ... but not papermill, the
# Jupyter kernel stack, plotly or pypdf, and its transformers may not be the one instab is tested with).
#
#   benchmarks/gpu_wheels.sh          # here, where pip reaches the package registry; writes .whl/ (git-ignored)
#
# Versions are pinned to this checkout's .venv (the tested ones); wheels for CPython 3.12 on manylinux x86-64
# (the H200 image's python3). Dependencies are resolved by pip, then the ones the GPU image already has
# (PRESENT, from /work/.library/device/KINDS.md's package list) are dropped, except the pinned FORCE ones.
# The folder must stay under the device tool's 64 MiB: the script prints its size and fails above it.
set -euo pipefail
cd "$(dirname "$0")/.."

FORCE=(transformers tokenizers regex huggingface-hub httpx2 httpcore2 click)  # transformers needs regex >= 2025.10.22, huggingface-hub >= 2.4
NEED=(papermill nbclient nbformat ipykernel jupyter_client jupyter_core traitlets ipython pyzmq tornado plotly pypdf
      transformers tokenizers regex huggingface-hub httpx2 httpcore2 click)
PRESENT=" absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
  charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 h5py hf-xet
  httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl
  mpmath msgpack multidict narwhals networkx numpy packaging pandas pillow pip pluggy propcache protobuf psutil
  pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scipy setuptools shellingham
  six sympy tabulate tqdm typer typing-extensions urllib3 wheel wrapt yarl zipp torch triton "

PRESENT=" $(echo $PRESENT) "
PY=${PY:-.venv/bin/python}
pins=()
for name in "${NEED[@]}"; do
  v=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: $name is not installed in $PY's environment (make setup first)" >&2; exit 1; }
  pins+=("$name==$v")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${pins[@]}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
rm -f .whl/*.whl
for whl in "$tmp"/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1 | tr '_A-Z' '-a-z')
  keep=1
  case "$PRESENT" in *" $dist "*) keep=0 ;; esac
  for f in "${FORCE[@]}"; do [ "$dist" = "$f" ] && keep=1; done
  [ "$keep" = 1 ] && cp "$whl" .whl/
done
ls .whl
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: $(ls .whl | wc -l) wheels, ${size} MiB in .whl/"
[ "$size" -le 60 ] || { echo "gpu_wheels: .whl is over the device tool's limit (64 MiB with the tree)" >&2; exit 1; }
