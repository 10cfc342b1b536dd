#!/usr/bin/env bash
# Re-resolve the pinned dependency sets from pyproject.toml (the one place they are declared):
#   requirements/dev.lock   everything, used by ./dev.sh (set-up, tests, CI)
#   requirements/bento.txt  run-time only, without the CUDA wheels, used by bentofile.yaml;
#                           the Bento's Docker build takes torch from PyTorch's CPU index.
# Both read their current pins as preferences: a re-lock changes only what pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=".venv/bin/uv"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header)
"$uv" pip compile pyproject.toml --extra dev "${common[@]}" --quiet -o requirements/dev.lock
# --no-annotate: the "# via" notes would still name the CUDA wheels removed below
"$uv" pip compile pyproject.toml "${common[@]}" --no-annotate --quiet -o requirements/bento.txt
grep -vE '^(cuda-[a-z-]+|nvidia-(cu|nv|nccl)[a-z0-9-]*|triton)==' requirements/bento.txt > requirements/bento.txt.tmp
mv requirements/bento.txt.tmp requirements/bento.txt
echo "wrote requirements/dev.lock and requirements/bento.txt"
