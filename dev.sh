#!/usr/bin/env bash
# Project entry point. Creates and uses the virtual environment at .venv.
#
#   ./dev.sh serve        set up, import the shipped model if the store has none, serve on 127.0.0.1:3000
#   ./dev.sh test [ARGS]  set up and run the whole test suite (ARGS go to pytest)
#   ./dev.sh setup        only create/refresh .venv (fast no-op when up to date)
#   ./dev.sh run CMD...   run a command inside the environment, in the current folder, e.g. ./dev.sh run python -m models_registry list
set -euo pipefail
caller=$PWD  # relative paths given to `run` (and settings files given to `serve`) are relative to it
cd "$(dirname "$0")"
export BENTOML_DO_NOT_TRACK=true

python_311() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# Debian packages some checks need, installed once per set-up when missing. Best effort: without root or apt-get,
# or when the install fails, print one line; the checks that need them then skip with a message saying why.
#   promtool (package prometheus): deploy/prometheus/ in tests/test_deploy.py
#   chromium + chromedriver (chromium, chromium-driver): the web page's browser tests, tests/test_ui.py
apt_updated=
apt_install() {  # apt_install WHAT COMMAND PACKAGE...: install PACKAGEs unless COMMAND exists; one line either way
  local what=$1 command=$2; shift 2
  command -v "$command" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 &&
     { [ -n "$apt_updated" ] || apt-get update -qq >/dev/null 2>&1; } && apt_updated=1 &&
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       -o DPkg::Lock::Timeout=120 "$@" >/dev/null 2>&1 &&
     command -v "$command" >/dev/null 2>&1; then
    echo "installed $what (Debian package $*)" >&2
  else
    echo "note: $what not installed (needs root and apt-get); the checks that need it will skip" >&2
  fi
}

install_debian_tools() {
  apt_install "promtool for the alert-rule checks" promtool prometheus || true
  apt_install "chromium and chromedriver for the browser tests" chromedriver chromium chromium-driver || true
}

setup() {
  local py stamp
  py=$(python_311)
  # A .venv that cannot run Python 3.11 (its interpreter removed or upgraded, one an IDE made with another Python)
  # is made anew: `venv` alone left a dangling interpreter link in place, and both commands failed for good.
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    if [ -e .venv ]; then echo "making .venv anew: it does not run Python 3.11" >&2; fi
    "$py" -m venv --clear .venv
  fi
  # The editable install records this folder's path: a moved checkout sets up again.
  # The first line names how .venv is built: a change to the steps below sets existing environments up again.
  stamp=$( (echo "bytecode compiled at install"; pwd; cat pyproject.toml requirements/dev.lock; cat api/proto/pneumonia/v1/*.proto scripts/gen_proto.py 2>/dev/null || true) |
          sha256sum | cut -c1-32)
  if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "setting up .venv (first run installs PyTorch, a few GB) ..." >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
    # Compiled at install, once: uv writes no bytecode by default, and where Python may not write it either
    # (PYTHONDONTWRITEBYTECODE, a read-only venv) every start of a server worker or a CLI would compile torch and
    # bentoml again, about 4 s of CPU each (7.5 s -> 3.3 s user for `import torch, torchvision, bentoml` here).
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -r requirements/dev.lock
    .venv/bin/python scripts/gen_proto.py
    # The project itself, editable: its packages import from this folder, no PYTHONPATH or sys.path edits.
    .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
    install_debian_tools
    echo "$stamp" > .venv/.setup-stamp
  fi
  # generated stubs are git-ignored: a fresh checkout or a clean may lack them while the stamp is current
  if [ ! -f api/_proto/__init__.py ]; then .venv/bin/python scripts/gen_proto.py; fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  serve)
    setup
    for name in PNEUMONIA_SETTINGS_FILE PNEUMONIA_SECURITY__API_KEYS_FILE PNEUMONIA_GRPC__TLS__CERTFILE \
                PNEUMONIA_GRPC__TLS__KEYFILE PNEUMONIA_GRPC__TLS__CLIENT_CA_FILE; do  # files named relative to the caller
      if [ -n "${!name:-}" ] && [ "${!name#/}" = "${!name}" ]; then export "$name=$caller/${!name}"; fi
    done
    .venv/bin/python -m models_registry ensure-default
    exec .venv/bin/bentoml serve service:PneumoniaClassifier --host "${HOST:-127.0.0.1}" --port "${PORT:-3000}" "$@"
    ;;
  test)
    setup
    exec .venv/bin/python -m pytest "$@"
    ;;
  run)
    if [ $# -eq 0 ]; then echo "usage: ./dev.sh run CMD... (e.g. ./dev.sh run python -m models_registry list)" >&2; exit 2; fi
    setup
    export PATH="$PWD/.venv/bin:$PATH"
    cd "$caller"  # the project is installed editable: its modules import from any folder
    exec "$@"
    ;;
  *) sed -n '2,7p' "${BASH_SOURCE[0]##*/}" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;  # we are in its folder
esac
