#!/usr/bin/env bash
# Idempotent setup of a fresh Debian/Ubuntu machine for snakelearn:
#   system packages (mosquitto broker, Fashion-MNIST data set), Jane Austen's novels (unpacked, not installed)
#   and a venv in .venv with the coordinator, agent and dev extras. Re-running only does what is missing.
# Usage: bash tools/setup.sh [EXTRAS]   (default EXTRAS: coordinator,dev; venv path: $SNAKE_VENV or .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-coordinator,dev}"
venv="${SNAKE_VENV:-.venv}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)  # foreign clients in the security tests
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Jane Austen's novels for the language-model data set `austen`: the Debian package's files only (installing it
# would pull in R), fetched now so nothing downloads at run time. coordinator/text/austen.py looks here.
austen_dir=".data/janeaustenr"
if [ ! -f "$austen_dir/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ] \
   && [ ! -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  apt-cache policy r-cran-janeaustenr 2>/dev/null | grep -q "Candidate: [0-9]" || $sudo apt-get update -qq
  deb_dir="$(mktemp -d)"
  echo "setup: fetching r-cran-janeaustenr (apt-get download) into $austen_dir" >&2
  (cd "$deb_dir" && apt-get download -qq r-cran-janeaustenr 2>&1 | grep -v "unsandboxed" >&2 || true)
  deb="$(ls "$deb_dir"/r-cran-janeaustenr_*.deb 2>/dev/null | head -1 || true)"
  if [ -n "$deb" ]; then
    mkdir -p "$austen_dir" && dpkg -x "$deb" "$austen_dir"
  else
    echo "setup: WARNING: could not download r-cran-janeaustenr; the austen data set and its tests are unavailable" >&2
  fi
  rm -rf "$deb_dir"
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
if [ "${SNAKE_FROM_WHEEL:-0}" = "1" ]; then
  # Install what users get: a wheel built from this checkout, not an editable link to it (CI agent tiers).
  rm -rf "$venv/dist" && "$venv/bin/python" -m pip wheel -q --no-deps -w "$venv/dist" . 2>&1 | grep -vE "is ignored|^$" >&2 || true
  wheel="$(ls "$venv"/dist/snakelearn-*.whl)"
  echo "setup: installing $(basename "$wheel")[$extras] into $venv" >&2
  "$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel" 2>&1 | grep -vE "is ignored|^$" >&2 || true
  "$venv/bin/python" -m pip install -q "${wheel}[${extras}]" 2>&1 | grep -vE "is ignored|^$" >&2 || true
  (py_abs="$(realpath "$venv")/bin/python" && cd / && "$py_abs" -c "import edge_agent") || { echo "setup: wheel install failed" >&2; exit 1; }
  stamp="$venv/.snakelearn-wheel"  # never skip: the wheel is rebuilt from the checkout every time
  touch "$stamp"
elif [ ! -f "$stamp" ]; then
  echo "setup: installing snakelearn[$extras] into $venv" >&2
  "$venv/bin/python" -m pip install -q -e ".[${extras}]" 2>&1 | grep -vE "is ignored|^$" >&2 || true
  "$venv/bin/python" -c "import edge_agent, coordinator" || { echo "setup: install failed" >&2; exit 1; }
  touch "$stamp"
fi
echo "setup: ready ($venv)" >&2
