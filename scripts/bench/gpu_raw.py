"""The raw engine beside the hub: ONNX Runtime in Python running one model at fixed batch sizes,
closed loop, for `seconds` per size; prints one JSON line per size (rows/s, p50/p99 ms of a batch).

On the CUDA provider the inputs and outputs are bound to device buffers allocated once per batch
size and reused (IO binding), so the loop measures the GPU's work, not host-device copies; on the
CPU provider the session runs plainly.

  .venv/bin/python scripts/bench/gpu_raw.py MODEL.onnx PROVIDER SECONDS SIZE [SIZE ...]
  PROVIDER: cuda | tensorrt | cpu
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort

DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}


def inputs_for(session, rows):
    feed = {}
    for i in session.get_inputs():
        shape = [rows] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
        dtype = DTYPES[i.type]
        if dtype == np.int64:
            feed[i.name] = np.random.randint(0, 1000, size=shape, dtype=np.int64)
        elif dtype == np.uint8:
            feed[i.name] = np.random.randint(0, 256, size=shape, dtype=np.uint8)
        else:
            feed[i.name] = np.random.rand(*shape).astype(np.float32)
    return feed


def main():
    model, provider, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sizes = [int(s) for s in sys.argv[4:]]
    options = ort.SessionOptions()
    providers = list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"]))  # CPU as the fallback, once
    session = ort.InferenceSession(model, options, providers=providers)
    used = session.get_providers()[0]
    on_gpu = used != "CPUExecutionProvider"
    for rows in sizes:
        feed = inputs_for(session, rows)
        if on_gpu:
            binding = session.io_binding()
            for name, array in feed.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", 0)

            def run():
                session.run_with_iobinding(binding)
        else:
            def run():
                session.run(None, feed)
        run()  # the first run of a shape pays its one-off costs
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        times.sort()
        pick = lambda p: times[min(len(times) - 1, int(round((len(times) - 1) * p)))] * 1e3
        print(json.dumps({"model": model, "provider": used, "io_binding": on_gpu, "rows": rows,
                          "rows_per_s": round(rows * len(times) / elapsed, 1),
                          "batch_p50_ms": round(pick(0.5), 2), "batch_p99_ms": round(pick(0.99), 2),
                          "runs": len(times)}), flush=True)


if __name__ == "__main__":
    main()
