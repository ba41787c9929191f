# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Shared helpers for scripts/*.sh. Source it; it changes the working directory to the repo root
# (PEFT_ROOT) and remembers the caller's directory in PEFT_CALLER_PWD.
# shellcheck shell=bash

# shellcheck disable=SC2034  # used by the scripts that source this file
PEFT_CALLER_PWD="$PWD"  # where the user ran the script from (demo.sh runs the example there)
PEFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PEFT_ROOT" || exit 1

# Debian packages the build, tests and examples need.
PEFT_APT_PACKAGES=(cmake g++ make libeigen3-dev catch2 nlohmann-json3-dev libcli11-dev)
# Open MPI for peft::mpi and the tests under mpirun (tests/mpi); without it they are skipped.
# shellcheck disable=SC2034  # used by the scripts that source this file
PEFT_MPI_APT_PACKAGES=(openmpi-bin libopenmpi-dev)

peft_banner() {
  printf '\n==== %s ====\n' "$*"
}

peft_elapsed() {  # seconds -> "1m23s"
  local s=$1
  printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# The Python that Debian's python3-* packages install for (a pyenv or venv python3 earlier in
# PATH would not see python3-matplotlib); any python3 elsewhere.
peft_python() {
  if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3; fi
}

peft_nproc() {
  nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2
}

# Installs whatever of PEFT_APT_PACKAGES (and the packages given as arguments) is missing; never
# prompts.
peft_ensure_deps() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "peft: not a Debian-like system; assuming these are installed: ${PEFT_APT_PACKAGES[*]}" >&2
    return 0
  fi
  local missing=() pkg
  for pkg in "${PEFT_APT_PACKAGES[@]}" "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  local install="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    echo "peft: installing missing packages: ${missing[*]}"
    apt-get update </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" </dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "peft: installing missing packages with sudo: ${missing[*]}"
    sudo -n apt-get update </dev/null
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" </dev/null
  else
    echo "peft: missing packages: ${missing[*]}" >&2
    echo "peft: install them as root, then re-run:" >&2
    echo "  sudo sh -c '$install'" >&2
    exit 1
  fi
}
