#!/usr/bin/env bash
# Creates (once) and refreshes the project's virtual environment in .venv.
# Sourced by scripts/test and scripts/bench; safe to run on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
# The CPU dev/CI machines have torch 2.13.0 as a local wheel; a looser pin would pull a
# multi-GB CUDA build. GPU machines bring their own torch (set DIFFORGE_TORCH=skip).
torch_pin="${DIFFORGE_TORCH:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[difforge] creating $venv" >&2
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null && [ "$torch_pin" != "skip" ]; then
  echo "[difforge] installing $torch_pin" >&2
  "$py" -m pip install -q "$torch_pin"
fi
# Reinstall only when the package metadata changed (pip is slow to no-op).
stamp="$venv/.difforge-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "[difforge] installing difforge[dev,diffusers] (editable)" >&2
  "$py" -m pip install -q -e "$root[dev,diffusers]"
  touch "$stamp"
fi
