# Sourced by ./uta: creates (once) and activates the project's virtual environment, and puts
# this checkout first on PYTHONPATH.
# The environment holds the dependencies only, never the project itself: it is cached outside
# the checkout, keyed by pyproject.toml, and shared by every checkout on the machine (a second
# clone, a CI run, another branch). Each checkout runs its own code because its root is on
# PYTHONPATH, which every process it starts inherits (pytest, the local Ray it starts, Ray's
# workers). Set UTA_VENV to put it elsewhere. The install pulls the torch build with CUDA
# libraries (it also runs on CPU machines): about 6-7 GB, ~5 min.
_uta_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_uta_key="$( (cat "$_uta_root/pyproject.toml"; python3 --version) | sha256sum | cut -c1-12)"
UTA_VENV="${UTA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/venv-$_uta_key}"
if [ ! -f "$UTA_VENV/.complete" ]; then
  # One creator at a time: a second ./uta started meanwhile (another checkout, a CI job) waits for it.
  mkdir -p "$(dirname "$UTA_VENV")"
  exec 9>"$UTA_VENV.lock"
  if command -v flock >/dev/null; then flock 9; fi
  if [ ! -f "$UTA_VENV/.complete" ]; then
    echo "[uta] creating the Python environment in $UTA_VENV (first run only, ~5 min)" >&2
    rm -rf "$UTA_VENV"
    python3 -m venv "$UTA_VENV"
    "$UTA_VENV/bin/pip" install --quiet --upgrade pip "setuptools>=68" wheel
    # The project's dependencies (pyproject.toml is their one list), then the project itself
    # out again: its code comes from the checkout on PYTHONPATH.
    "$UTA_VENV/bin/pip" install --quiet "$_uta_root[dev]"
    "$UTA_VENV/bin/pip" uninstall --quiet --yes uta-pipelines
    touch "$UTA_VENV/.complete"
  fi
  exec 9>&-
fi
if [ -f "$UTA_VENV/.uta-root" ]; then
  # An environment made by an older env.sh holds an editable install of one checkout: drop it.
  "$UTA_VENV/bin/pip" uninstall --quiet --yes uta-pipelines >/dev/null 2>&1 || true
  rm -f "$UTA_VENV/.uta-root"
fi
# shellcheck disable=SC1091
source "$UTA_VENV/bin/activate"
export UTA_VENV
export PYTHONPATH="$_uta_root${PYTHONPATH:+:$PYTHONPATH}"
unset _uta_root _uta_key
