#!/usr/bin/env bash
# Installs everything the tests need, idempotently, and generates the test models.
#
#   .venv/                      Python venv with scripts/requirements.txt (onnxruntime 1.31, scikit-learn, ...)
#   build/models, reference/    models and reference outputs (scripts/gen_models.py)
#   build/ort-old/              an old ONNX Runtime (1.20) for the "library too old" error test
#   build/ort-dylib-path        full path of the ONNX Runtime library the fabric should load
#   Debian packages             prometheus, chromium, systemd, curl, etcd-server (the replicated
#                               registry's tests start their own 3-member cluster), protobuf-compiler
#                               and libprotobuf-dev (etcd-client compiles etcd's .proto files at build)
#
# Re-running does only what changed: the venv is rebuilt when requirements.txt changes, the models
# when gen_models.py or the requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p build

step() { printf '==> %s\n' "$*"; }

# Debian packages the tests use: Prometheus and promtool (alert rules, a real scrape), Chromium (the
# registry's status page, headless), systemd-analyze (the units), curl (the main command's checks),
# etcd (the replicated registry); and the build: protoc with the well-known types (etcd-client).
missing=()
command -v prometheus > /dev/null && command -v promtool > /dev/null || missing+=(prometheus)
command -v chromium > /dev/null || missing+=(chromium)
command -v systemd-analyze > /dev/null || missing+=(systemd)
command -v curl > /dev/null || missing+=(curl)
command -v etcd > /dev/null || missing+=(etcd-server)
command -v protoc > /dev/null || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

if [ ! -x .venv/bin/python ]; then
  step "creating Python venv in .venv"
  "$PYTHON" -m venv .venv
fi

req_hash=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null || true)" != "$req_hash" ]; then
  step "installing Python packages (scripts/requirements.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
  echo "$req_hash" > .venv/.requirements.sha256
fi

if [ ! -f build/ort-old/libonnxruntime.so.1.20.1 ]; then
  step "fetching onnxruntime 1.20.1 (for the version-mismatch test)"
  rm -rf build/ort-old && mkdir -p build/ort-old/wheel
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d build/ort-old/wheel onnxruntime==1.20.1
  .venv/bin/python - <<'PY'
import glob, zipfile
whl = glob.glob("build/ort-old/wheel/onnxruntime-1.20.1-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/libonnxruntime.so.1.20.1"))
    with open("build/ort-old/libonnxruntime.so.1.20.1", "wb") as f:
        f.write(z.read(name))
PY
  rm -rf build/ort-old/wheel
fi

.venv/bin/python - > build/ort-dylib-path <<'PY'
import glob, os, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
print(sorted(glob.glob(os.path.join(capi, "libonnxruntime.so.1.*")))[-1])
PY

models_hash=$(cat scripts/gen_models.py scripts/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat build/.models.sha256 2>/dev/null || true)" != "$models_hash" ] || [ ! -d build/reference ]; then
  step "generating test models into build/"
  .venv/bin/python scripts/gen_models.py --out build
  echo "$models_hash" > build/.models.sha256
fi
step "setup done; ONNX Runtime: $(cat build/ort-dylib-path)"
