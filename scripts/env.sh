# Sourced by ./uta: creates (once) and activates the project's virtual environment.
# The environment is cached outside the checkout, keyed by pyproject.toml, so a second
# clone or a CI run reuses it; set UTA_VENV to put it elsewhere. The install pulls the
# torch build with CUDA libraries (it also runs on CPU machines): about 6-7 GB, ~5 min.
_uta_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_uta_key="$( (cat "$_uta_root/pyproject.toml"; python3 --version) | sha256sum | cut -c1-12)"
UTA_VENV="${UTA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/venv-$_uta_key}"
if [ ! -f "$UTA_VENV/.complete" ]; then
  echo "[uta] creating the Python environment in $UTA_VENV (first run only, ~5 min)" >&2
  rm -rf "$UTA_VENV"
  python3 -m venv "$UTA_VENV"
  "$UTA_VENV/bin/pip" install --quiet --upgrade pip "setuptools>=68" wheel
  "$UTA_VENV/bin/pip" install --quiet -e "$_uta_root[dev]"
  touch "$UTA_VENV/.complete"
  echo "$_uta_root" > "$UTA_VENV/.uta-root"
fi
if [ "$(cat "$UTA_VENV/.uta-root" 2>/dev/null)" != "$_uta_root" ]; then
  # The cached environment was made for another checkout: point it at this one.
  "$UTA_VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e "$_uta_root"
  echo "$_uta_root" > "$UTA_VENV/.uta-root"
fi
# shellcheck disable=SC1091
source "$UTA_VENV/bin/activate"
export UTA_VENV
unset _uta_root _uta_key
