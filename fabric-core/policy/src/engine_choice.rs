//! Which engine serves a model under `engine = "auto"`: the faster on that model's warm-up batches.
//!
//! Both engines ran each warm-up batch size a few times, interleaved; each size counts its fastest
//! run (the least disturbed by whatever else the machine was doing). Sizes weigh equally: the
//! speed-up is the geometric mean over sizes of tract's time over ONNX Runtime's. Ties go to tract,
//! the engine that needs no library and holds no second copy of the weights: ONNX Runtime must be
//! [`MIN_SPEEDUP`] faster to be chosen.

use std::time::Duration;

use fabric_types::EngineKind;

/// How much faster ONNX Runtime must be (geometric mean over batch sizes) to be chosen over tract.
pub const MIN_SPEEDUP: f64 = 1.1;

/// The fastest run of one batch size on each engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeTiming {
    /// Rows in the batch.
    pub rows: usize,
    /// tract's fastest run.
    pub tract: Duration,
    /// ONNX Runtime's fastest run.
    pub ort: Duration,
}

/// The engine chosen and by how much.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    /// The engine that serves.
    pub kind: EngineKind,
    /// tract's time over ONNX Runtime's, geometric mean over sizes (above 1: ONNX Runtime faster).
    pub tract_over_ort: f64,
}

/// Picks the engine from per-size timings; tract when there are none.
pub fn pick(timings: &[SizeTiming]) -> Pick {
    let ratios: Vec<f64> = timings
        .iter()
        .filter(|t| !t.tract.is_zero() && !t.ort.is_zero())
        .map(|t| (t.tract.as_secs_f64() / t.ort.as_secs_f64()).ln())
        .collect();
    if ratios.is_empty() {
        return Pick { kind: EngineKind::Tract, tract_over_ort: 1.0 };
    }
    let tract_over_ort = (ratios.iter().sum::<f64>() / ratios.len() as f64).exp();
    let kind = if tract_over_ort >= MIN_SPEEDUP { EngineKind::Ort } else { EngineKind::Tract };
    Pick { kind, tract_over_ort }
}

/// The choice said in words, for the log, `/config` and the load report.
pub fn explain(pick: &Pick, timings: &[SizeTiming]) -> String {
    let sizes = match (timings.first(), timings.last()) {
        (Some(a), Some(b)) if a.rows != b.rows => format!("batch sizes {}..{}", a.rows, b.rows),
        (Some(a), _) => format!("batch size {}", a.rows),
        _ => return "auto: nothing could be timed; tract".to_string(),
    };
    let one = timings
        .first()
        .map(|t| {
            format!(
                "; batch {}: tract {:.3} ms, onnxruntime {:.3} ms",
                t.rows,
                t.tract.as_secs_f64() * 1e3,
                t.ort.as_secs_f64() * 1e3
            )
        })
        .unwrap_or_default();
    match pick.kind {
        EngineKind::Ort => {
            format!("auto: onnxruntime {:.2}x as fast as tract over {sizes}{one}", pick.tract_over_ort)
        }
        EngineKind::Tract if pick.tract_over_ort >= 1.0 => format!(
            "auto: tract, onnxruntime only {:.2}x as fast over {sizes} (under {MIN_SPEEDUP}x){one}",
            pick.tract_over_ort
        ),
        EngineKind::Tract => {
            format!("auto: tract {:.2}x as fast as onnxruntime over {sizes}{one}", 1.0 / pick.tract_over_ort)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, tract_us: u64, ort_us: u64) -> SizeTiming {
        SizeTiming { rows, tract: Duration::from_micros(tract_us), ort: Duration::from_micros(ort_us) }
    }

    #[test]
    fn pick_table() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<SizeTiming>, EngineKind, f64)> = vec![
            ("nothing timed: tract", vec![], EngineKind::Tract, 1.0),
            ("onnxruntime 3x at every size", vec![t(1, 1200, 400), t(32, 90_000, 30_000)], EngineKind::Ort, 3.0),
            ("tract 4x at every size", vec![t(1, 5, 20), t(64, 40, 160)], EngineKind::Tract, 0.25),
            ("a tie goes to tract", vec![t(1, 100, 100)], EngineKind::Tract, 1.0),
            ("5% faster is not enough", vec![t(1, 105, 100)], EngineKind::Tract, 1.05),
            ("11% faster is", vec![t(1, 111, 100)], EngineKind::Ort, 1.11),
            // Sizes weigh equally: 2x at one size and 1/2x at the other cancel out, whatever the times.
            ("mixed: batch 1 to tract, 32 to onnxruntime", vec![t(1, 10, 20), t(32, 2000, 1000)], EngineKind::Tract, 1.0),
            ("a size without a time is left out", vec![t(1, 0, 20), t(8, 300, 100)], EngineKind::Ort, 3.0),
        ];
        for (label, timings, kind, ratio) in cases {
            let got = pick(&timings);
            assert_eq!(got.kind, kind, "{label}");
            assert!((got.tract_over_ort - ratio).abs() < 1e-9, "{label}: {}", got.tract_over_ort);
        }
    }

    #[test]
    fn explanations_name_the_winner_and_the_figures() {
        let timings = [t(1, 1200, 400), t(64, 90_000, 30_000)];
        let text = explain(&pick(&timings), &timings);
        assert!(text.starts_with("auto: onnxruntime 3.00x as fast as tract over batch sizes 1..64"), "{text}");
        assert!(text.contains("batch 1: tract 1.200 ms, onnxruntime 0.400 ms"), "{text}");
        let timings = [t(1, 5, 20)];
        assert!(explain(&pick(&timings), &timings).starts_with("auto: tract 4.00x as fast as onnxruntime"));
    }
}
