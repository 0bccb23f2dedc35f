# Sourced by the benchmark scripts that drive load with wrk: the test setup, wrk (Debian package), the
# benchmarks' Python packages, and the ONNX Runtime library path.
bash scripts/setup.sh
if ! command -v wrk >/dev/null; then
  echo "==> installing wrk (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
  else sudo apt-get install -y -q wrk >/dev/null; fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/bench/requirements.txt
export ORT_DYLIB_PATH="$(cat build/ort-dylib-path)"
