#!/usr/bin/env bash
# Type-check the TensorRT layer against NVIDIA's published API stubs (tensorrt-stubs 10.13).
#
# The stubs are unpacked into .stubs/ (never into the environment: installed, they make
# `import tensorrt` succeed as an empty module). The published 10.13.0.35.1 files do not
# parse as they are: a parameter named `in` (a keyword) and a required parameter after
# defaulted ones in add_scale_nd. Both are renamed/defaulted here; nothing else is changed,
# and errors inside the stub files themselves are not reported (see pyproject's mypy overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STUBS=.stubs
if [ ! -f "$STUBS/patched/tensorrt_bindings/tensorrt.pyi" ]; then
  rm -rf "$STUBS"
  "$PY" -m pip install -q --no-deps --target "$STUBS/site" tensorrt-stubs==10.13.0.35.1
  mkdir -p "$STUBS/patched"
  cp -r "$STUBS/site/tensorrt" "$STUBS/site/tensorrt_bindings" "$STUBS/patched/"
  sed -i -E 's/\bin: (list\[)/in_: \1/g' "$STUBS/patched/tensorrt_bindings/tensorrt.pyi"
  sed -i -E 's/(def add_scale_nd\(.*), channel_axis: int\)/\1, channel_axis: int = 0)/' \
    "$STUBS/patched/tensorrt_bindings/tensorrt.pyi"
fi
MYPYPATH="$STUBS/patched" "$PY" -m mypy --no-incremental \
  ecar_export/backends/tensorrt.py runtime/backends/tensorrt
