#!/usr/bin/env bash
# Idempotent setup of a fresh Debian/Ubuntu machine for snakelearn:
#   system packages (mosquitto broker, Fashion-MNIST data set) and a venv in .venv
#   with the coordinator, agent and dev extras. Re-running only does what is missing.
# Usage: bash tools/setup.sh [EXTRAS]   (default EXTRAS: coordinator,dev; venv path: $SNAKE_VENV or .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-coordinator,dev}"
venv="${SNAKE_VENV:-.venv}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3.12 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $($py --version)" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
stamp="$venv/.snakelearn-$(cat setup.cfg | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing snakelearn[$extras] into $venv" >&2
  "$venv/bin/python" -m pip install -q -e ".[${extras}]" 2>&1 | grep -vE "is ignored|^$" >&2 || true
  "$venv/bin/python" -c "import edge_agent, coordinator" || { echo "setup: install failed" >&2; exit 1; }
  touch "$stamp"
fi
echo "setup: ready ($venv)" >&2
