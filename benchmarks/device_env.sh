# Sourced by the one-call device scripts: pure-Python wheels in .whl/ (diffusers, for a machine that
# lacks them) installed into /tmp/site. Sets SITE to "/tmp/site:" (a PYTHONPATH prefix) or "".
SITE=
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  SITE=/tmp/site:
fi
