# Sourced by the benchmarks that drive load with Triton's perf_analyzer: installs it, from PyPI
# packages only (idempotent), into build/perf_analyzer: the binary from the tritonclient 2.41.0
# wheel (the last that carries it), the CUDA runtime library it links (nvidia-cuda-runtime-cu12,
# loaded but unused: no GPU is needed) and Debian's libb64. Sets PERF_ANALYZER to a command line.
pa_dir=build/perf_analyzer
if [ ! -x "$pa_dir/bin/perf_analyzer" ] || [ ! -f "$pa_dir/lib/libcudart.so.12" ]; then
  echo "==> installing perf_analyzer (tritonclient 2.41.0 wheel) into $pa_dir"
  rm -rf "$pa_dir" && mkdir -p "$pa_dir/bin" "$pa_dir/lib" "$pa_dir/wheels"
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$pa_dir/wheels" \
    tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.4.127
  unzip -q -o -j "$pa_dir"/wheels/tritonclient-2.41.0-*.whl 'tritonclient-2.41.0.data/data/bin/perf_analyzer' -d "$pa_dir/bin"
  unzip -q -o -j "$pa_dir"/wheels/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$pa_dir/lib"
  chmod +x "$pa_dir/bin/perf_analyzer"
fi
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  echo "==> installing libb64-0d (Debian package, for perf_analyzer)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q libb64-0d >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }
  else sudo apt-get install -y -q libb64-0d >/dev/null; fi
fi
export PERF_ANALYZER="env LD_LIBRARY_PATH=$PWD/$pa_dir/lib $PWD/$pa_dir/bin/perf_analyzer"
