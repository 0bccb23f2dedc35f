//! GPU serving decisions: batch buckets (a batch padded up to one of a few sizes, so that a GPU
//! engine sees few shapes and can keep a buffer set, a CUDA graph or a TensorRT profile per size),
//! the on-disk key of a compiled TensorRT engine, how many replicas share one GPU (from throughput
//! measured at 1, 2, 3 streams), and whether a version fits in what the GPU has free.
//!
//! Why buckets: a dynamic batcher makes nearly every batch size between 1 and its cap, and a GPU
//! engine pays per new shape (cuDNN's algorithm search, a TensorRT profile, a graph capture, fresh
//! device buffers). Padding a batch of 5 to 8 costs 3 rows of compute the GPU does in parallel
//! anyway; a new shape costs milliseconds to seconds.

/// Batch sizes a GPU engine is built and warmed for: powers of two up to the cap, and the cap.
pub fn buckets(max_batch: usize) -> Vec<usize> {
    let max = max_batch.max(1);
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(1usize), |&b| b.checked_mul(2)).take_while(|&b| b < max).collect();
    sizes.push(max);
    sizes
}

/// One engine run of a batch: `rows` real rows, padded up to `bucket`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Rows of the batch in this run.
    pub rows: usize,
    /// The bucket it runs at (rows plus padding).
    pub bucket: usize,
}

/// How a batch of `rows` runs over `buckets` (ascending): as few runs as the largest bucket allows,
/// each padded to the smallest bucket that holds it. Empty when there are no rows or no buckets.
pub fn plan(rows: usize, buckets: &[usize]) -> Vec<Run> {
    let Some(&largest) = buckets.last() else { return Vec::new() };
    let mut runs = Vec::new();
    let mut left = rows;
    while left > 0 {
        let take = left.min(largest);
        let bucket = buckets.iter().copied().find(|&b| b >= take).unwrap_or(largest);
        runs.push(Run { rows: take, bucket });
        left -= take;
    }
    runs
}

/// The folder (relative to the engine cache) holding the TensorRT engines of one model file on one
/// GPU and runtime: an engine is valid only for the exact model, GPU and TensorRT/ONNX Runtime
/// build it was compiled on, so each of these is in the key (the digest's first 16 hex digits, a
/// `sha256:` prefix dropped); the buckets are in the engine's own profile. Characters that are not safe in a file name become `-`.
pub fn engine_cache_key(model_digest: &str, gpu: &str, runtime: &str, max_batch: usize) -> String {
    let safe = |s: &str| -> String {
        let mapped: String = s
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c.to_ascii_lowercase() } else { '-' })
            .collect();
        mapped.trim_matches('-').to_string()
    };
    let hex = model_digest.rsplit(':').next().unwrap_or(model_digest);
    let digest: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).take(16).collect();
    format!("{digest}-{}-{}-b{max_batch}", safe(gpu), safe(runtime))
}

/// Throughput measured with `streams` replicas sharing one GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamsThroughput {
    /// Replicas (each its own session and stream) running at once.
    pub streams: usize,
    /// Rows served per second at load.
    pub rows_per_s: f64,
}

/// How much more throughput one more replica must bring to be worth its GPU memory.
pub const MIN_GAIN_PER_STREAM: f64 = 0.05;

/// Replicas per GPU: the fewest streams whose throughput is within [`MIN_GAIN_PER_STREAM`] of the
/// next measured count's, walking up from one. One when nothing was measured.
pub fn replicas_per_gpu(measured: &[StreamsThroughput]) -> usize {
    let mut sorted: Vec<StreamsThroughput> =
        measured.iter().copied().filter(|m| m.streams > 0 && m.rows_per_s.is_finite()).collect();
    sorted.sort_by_key(|m| m.streams);
    let Some(first) = sorted.first() else { return 1 };
    let mut best = *first;
    for next in sorted.iter().skip(1) {
        if next.rows_per_s > best.rows_per_s * (1.0 + MIN_GAIN_PER_STREAM) {
            best = *next;
        } else {
            break;
        }
    }
    best.streams
}

/// Why a version cannot be placed on a GPU.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// Its replicas need more memory than the GPU has free.
    #[error("needs {need_mib} MiB of GPU memory ({replicas} replicas of {per_replica_mib} MiB) and the GPU has {free_mib} MiB free: lower replicas or max_batch_size, or place it on a larger GPU (--labels gpu=...)")]
    TooLarge {
        /// Memory all replicas need, MiB.
        need_mib: u64,
        /// Replicas asked for.
        replicas: usize,
        /// Memory one replica was measured to take, MiB.
        per_replica_mib: u64,
        /// Memory free on the GPU, MiB.
        free_mib: u64,
    },
}

/// Whether `replicas` of a version, each measured at `per_replica_mib`, fit in `free_mib`, keeping
/// a tenth of the GPU's memory (`total_mib`) free for the runtime's own workspace.
pub fn fits(replicas: usize, per_replica_mib: u64, free_mib: u64, total_mib: u64) -> Result<(), FitError> {
    let need_mib = per_replica_mib.saturating_mul(replicas as u64);
    let usable = free_mib.saturating_sub(total_mib / 10);
    if need_mib <= usable {
        Ok(())
    } else {
        Err(FitError::TooLarge { need_mib, replicas, per_replica_mib, free_mib })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_up_to_the_cap_and_the_cap() {
        let cases: [(usize, &[usize]); 6] = [
            (0, &[1]),
            (1, &[1]),
            (2, &[1, 2]),
            (8, &[1, 2, 4, 8]),
            (12, &[1, 2, 4, 8, 12]),
            (32, &[1, 2, 4, 8, 16, 32]),
        ];
        for (max, want) in cases {
            assert_eq!(buckets(max), want, "max batch {max}");
        }
    }

    #[test]
    fn a_batch_runs_padded_to_the_smallest_bucket_that_holds_it_split_at_the_largest() {
        let b = [1, 2, 4, 8];
        let r = |rows, bucket| Run { rows, bucket };
        let cases: [(usize, &[usize], Vec<Run>); 8] = [
            (0, &b, vec![]),
            (1, &b, vec![r(1, 1)]),
            (3, &b, vec![r(3, 4)]),
            (5, &b, vec![r(5, 8)]),
            (8, &b, vec![r(8, 8)]),
            (11, &b, vec![r(8, 8), r(3, 4)]),
            (17, &b, vec![r(8, 8), r(8, 8), r(1, 1)]),
            (4, &[], vec![]),
        ];
        for (rows, buckets, want) in cases {
            let got = plan(rows, buckets);
            assert_eq!(got, want, "{rows} rows over {buckets:?}");
            assert_eq!(got.iter().map(|r| r.rows).sum::<usize>(), if buckets.is_empty() { 0 } else { rows });
        }
    }

    #[test]
    fn an_engine_cache_key_names_model_gpu_runtime_and_cap_in_a_safe_file_name() {
        let cases = [
            (
                "sha256:0123456789abcdef0123",
                "NVIDIA H200",
                "ort-1.31.1/trt-10.9",
                32,
                "0123456789abcdef-nvidia-h200-ort-1.31.1-trt-10.9-b32",
            ),
            ("abc", "../../etc", "x", 1, "abc-..-..-etc-x-b1"),
            (
                "0123456789abcdef",
                "NVIDIA H100 80GB HBM3",
                "ort-1.31.1",
                8,
                "0123456789abcdef-nvidia-h100-80gb-hbm3-ort-1.31.1-b8",
            ),
        ];
        for (digest, gpu, runtime, max, want) in cases {
            let key = engine_cache_key(digest, gpu, runtime, max);
            assert_eq!(key, want);
            assert!(!key.contains('/'), "{key} is a single folder name");
        }
        assert_ne!(engine_cache_key("aa", "NVIDIA H100", "r", 8), engine_cache_key("aa", "NVIDIA H200", "r", 8));
    }

    #[test]
    fn replicas_per_gpu_stop_where_one_more_stream_brings_under_five_percent() {
        let m = |streams, rows_per_s| StreamsThroughput { streams, rows_per_s };
        let cases: [(&str, Vec<StreamsThroughput>, usize); 6] = [
            ("nothing measured", vec![], 1),
            ("one stream only", vec![m(1, 1000.0)], 1),
            ("a second stream doubles, a third adds 3%", vec![m(1, 1000.0), m(2, 1900.0), m(3, 1950.0)], 2),
            ("every stream adds", vec![m(3, 2900.0), m(1, 1000.0), m(2, 2000.0)], 3),
            ("a second stream is slower", vec![m(1, 1000.0), m(2, 900.0), m(3, 2000.0)], 1),
            ("a bad measurement is ignored", vec![m(1, 1000.0), m(2, f64::NAN), m(0, 5000.0)], 1),
        ];
        for (name, measured, want) in cases {
            assert_eq!(replicas_per_gpu(&measured), want, "{name}");
        }
    }

    #[test]
    fn a_version_fits_when_its_replicas_leave_a_tenth_of_the_gpu_free() {
        let cases = [
            (2, 1000, 80_000, 81_920, true),
            (3, 23_000, 80_000, 81_920, true),
            (4, 24_000, 80_000, 81_920, false),
            (1, 10_000, 10_000, 81_920, false),
            (0, 10_000, 0, 81_920, true),
        ];
        for (replicas, per, free, total, ok) in cases {
            let got = fits(replicas, per, free, total);
            assert_eq!(got.is_ok(), ok, "{replicas} x {per} MiB in {free} free of {total}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("lower replicas"), "the error says what to do: {e}");
            }
        }
    }
}
