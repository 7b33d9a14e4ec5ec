#!/usr/bin/env bash
# Development-machine half of a GPU run: wheels the GPU machine lacks, into .whl/, and a
# copy of the peers' harness into peers/ (both git-ignored; name them in the device
# tool's `carry`). The peers are never project dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
grep -qx '/peers/' .git/info/exclude || echo /peers/ >> .git/info/exclude
PY=${PYTHON:-python3}
if ! ls .whl/unsloth-*.whl >/dev/null 2>&1; then bash ../shared/peers/fetch_wheels.sh .whl; fi
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .whl \
  gguf==0.19.0 pytest==9.0.3 pluggy iniconfig pyyaml psutil nvidia-ml-py
rm -f .whl/slothnb-*.whl   # slothnb itself runs from the sent tree (PYTHONPATH), never a stale wheel
rm -rf peers && cp -r ../shared/peers peers
du -sh .whl peers
