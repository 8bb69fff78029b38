# Sourced by the one-call device scripts: pure-Python wheels in .whl/ (diffusers, for a machine that
# lacks them) installed into /tmp/site. Sets SITE to "/tmp/site:" (a PYTHONPATH prefix) or "", and
# defines run NAME TIMEOUT COMMAND...: the command's output to $OUT/NAME.log, one status line.
SITE=
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  SITE=/tmp/site:
fi
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
}
