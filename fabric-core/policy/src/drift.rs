//! Drift of a model version's inputs and predictions away from a reference sample (pure, no I/O).
//!
//! The reference is binned once, where the sample is pushed: per feature, the edges of its deciles
//! (duplicates merged, so a pixel that is almost always 0 gets two bins, not ten), the sample's
//! count in each bin, and the frequency of each class the model predicts on the sample. Nodes count
//! live rows into the same bins ([`DriftCounts`]); counts from many nodes add up.
//!
//! Each feature and the predictions get two scores:
//! - PSI, the population stability index, with its rule of thumb: under 0.1 none, 0.1 to 0.25
//!   moderate, over 0.25 significant ([`psi_band`]).
//! - The Jensen-Shannon distance (base 2, 0 to 1), less its expected value when nothing drifted
//!   ([`js_distance`]). This is what flags drift (at 0.1, Evidently's threshold for large samples).
//!   It measures how far apart the two distributions are, not how sure a test is that they differ,
//!   so it does not flag a negligible shift just because a million rows came in, as a
//!   Kolmogorov-Smirnov or chi-squared p-value does. The correction removes the bias of small
//!   samples: on 450 held-out digits against 1,347 training rows the plain distance reaches 0.096
//!   on one pixel with nothing drifted, the corrected one 0.074.

use fabric_types::tensor::Tensor;
use fabric_types::DataType;
use serde::{Deserialize, Serialize};

/// Quantile bins per feature (deciles).
pub const DEFAULT_BINS: usize = 10;
/// Most features an input may have for per-feature statistics (an image has too many to bin each).
pub const MAX_FEATURES: usize = 1024;
/// Most classes the predictions are counted in.
pub const MAX_CLASSES: usize = 1024;
/// Proportions below this count as this much in PSI (an empty bin would make it infinite).
const PSI_FLOOR: f64 = 1e-4;

/// Why a reference cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriftError {
    /// The sample has no rows or no features.
    #[error("the reference sample is empty ({rows} rows of {features} features)")]
    Empty { rows: usize, features: usize },
    /// Too many features to bin each.
    #[error("the input has {0} features per row; drift statistics are kept for inputs of at most {MAX_FEATURES}")]
    TooManyFeatures(usize),
    /// Values and shape disagree.
    #[error("the reference sample has {values} values, not {rows} rows x {features} features")]
    Shape { values: usize, rows: usize, features: usize },
}

/// A version's reference statistics: what nodes bin live rows by, and what they are compared with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// The model input the features are read from (each row flattened).
    pub input: String,
    /// Rows in the sample.
    pub rows: u64,
    /// Per feature, the ascending bin edges (a value `x` falls in bin `edges.partition_point(e < x)`).
    pub edges: Vec<Vec<f64>>,
    /// Per feature, the sample's count in each bin (one more than its edges).
    pub counts: Vec<Vec<u64>>,
    /// The model's predictions on the sample, when it has a class output.
    pub prediction: Option<PredictionReference>,
}

/// The class frequencies of a model's predictions on the reference sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredictionReference {
    /// The output the class is read from (an integer label, or the argmax of scores per row).
    pub output: String,
    /// Count per class, 0 up.
    pub classes: Vec<u64>,
}

/// Live rows counted into a reference's bins (on one node, or summed over many).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftCounts {
    /// Rows counted.
    pub rows: u64,
    /// Per feature, the count in each bin (shaped as the reference's).
    pub features: Vec<Vec<u64>>,
    /// Count per predicted class; the last slot holds classes the reference never saw.
    pub classes: Vec<u64>,
}

impl Reference {
    /// Bins a sample of `rows` rows of `features` values each (row-major), into `bins` quantile bins
    /// per feature.
    pub fn from_sample(
        input: &str,
        rows: usize,
        features: usize,
        values: &[f64],
        bins: usize,
    ) -> Result<Reference, DriftError> {
        if rows == 0 || features == 0 {
            return Err(DriftError::Empty { rows, features });
        }
        if features > MAX_FEATURES {
            return Err(DriftError::TooManyFeatures(features));
        }
        if rows.checked_mul(features) != Some(values.len()) {
            return Err(DriftError::Shape { values: values.len(), rows, features });
        }
        let mut edges = Vec::with_capacity(features);
        let mut column = Vec::with_capacity(rows);
        for f in 0..features {
            column.clear();
            column.extend((0..rows).map(|r| values[r * features + f]).filter(|v| !v.is_nan()));
            column.sort_by(f64::total_cmp);
            edges.push(quantile_edges(&column, bins));
        }
        let mut reference =
            Reference { input: input.to_string(), rows: 0, edges, counts: Vec::new(), prediction: None };
        let mut counts = reference.empty_counts();
        for row in values.chunks_exact(features) {
            counts.add_row(&reference, row.iter().copied());
        }
        reference.rows = counts.rows;
        reference.counts = counts.features;
        Ok(reference)
    }

    /// The same with the model's predicted class per sample row (from `output`).
    pub fn with_predictions(mut self, output: &str, predicted: &[usize]) -> Reference {
        let slots = predicted.iter().map(|c| c.saturating_add(1)).max().unwrap_or(0).min(MAX_CLASSES);
        let mut classes = vec![0u64; slots];
        for &c in predicted.iter().filter(|&&c| c < MAX_CLASSES) {
            classes[c] += 1;
        }
        self.prediction = Some(PredictionReference { output: output.to_string(), classes });
        self
    }

    /// Features per row.
    pub fn features(&self) -> usize {
        self.edges.len()
    }

    /// Zero counts shaped for this reference.
    pub fn empty_counts(&self) -> DriftCounts {
        DriftCounts {
            rows: 0,
            features: self.edges.iter().map(|e| vec![0; e.len() + 1]).collect(),
            classes: self.prediction.as_ref().map_or(Vec::new(), |p| vec![0; p.classes.len() + 1]),
        }
    }
}

impl DriftCounts {
    /// Counts one row's features (in order; extra values are ignored, missing ones not counted).
    pub fn add_row(&mut self, reference: &Reference, row: impl Iterator<Item = f64>) {
        for ((x, edges), counts) in row.zip(&reference.edges).zip(&mut self.features) {
            if let Some(slot) = counts.get_mut(bin_of(edges, x)) {
                *slot += 1;
            }
        }
        self.rows += 1;
    }

    /// Counts one predicted class (one the reference never saw goes to the last slot).
    pub fn add_class(&mut self, class: usize) {
        if let Some(last) = self.classes.len().checked_sub(1) {
            self.classes[class.min(last)] += 1;
        }
    }

    /// Adds another node's counts made against the same reference; counts of another shape are
    /// skipped (a node still on an older reference), and `false` says so.
    pub fn merge(&mut self, other: &DriftCounts) -> bool {
        let same_shape = self.features.len() == other.features.len()
            && self.features.iter().zip(&other.features).all(|(a, b)| a.len() == b.len())
            && self.classes.len() == other.classes.len();
        if !same_shape {
            return false;
        }
        self.rows += other.rows;
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.classes.iter_mut().zip(&other.classes).for_each(|(x, y)| *x += y);
        true
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// The output a model's predicted class is read from, by position: the first integer output of
/// one value per row (`[N]` or `[N, 1]`: a label), else the first floating-point output of several
/// values per row (`[N, C]`: scores, whose argmax is the class). `outputs`: name, type, shape (-1
/// dynamic).
pub fn class_output(outputs: &[(&str, DataType, &[i64])]) -> Option<usize> {
    let integer = |d: DataType| {
        matches!(
            d,
            DataType::Int64
                | DataType::Int32
                | DataType::Int16
                | DataType::Int8
                | DataType::Uint8
                | DataType::Uint16
                | DataType::Uint32
                | DataType::Uint64
        )
    };
    let label = outputs
        .iter()
        .position(|(_, d, shape)| integer(*d) && (shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)));
    label.or_else(|| {
        outputs
            .iter()
            .position(|(_, d, shape)| matches!(d, DataType::Fp32 | DataType::Fp64) && shape.len() == 2 && shape[1] != 1)
    })
}

/// The predicted class of each row of a class output (a label per row, or the argmax of its
/// scores); `None` for a tensor of another shape or type. Negative labels count as unseen classes.
pub fn classes_of(tensor: &Tensor) -> Option<Vec<usize>> {
    let shape = tensor.shape();
    let rows = *shape.first()?;
    let per_row = if rows == 0 { 0 } else { tensor.len() / rows };
    let values = values_f64(tensor)?;
    match (tensor.dtype(), shape.len(), per_row) {
        (DataType::Fp32 | DataType::Fp64, 2, n) if n > 1 => Some(
            values
                .chunks_exact(n)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold((0, f64::NEG_INFINITY), |best, (i, v)| if *v > best.1 { (i, *v) } else { best })
                        .0
                })
                .collect(),
        ),
        (DataType::Fp32 | DataType::Fp64, ..) => None,
        (_, 1, _) | (_, 2, 1) => Some(values.iter().map(|v| if *v < 0.0 { usize::MAX } else { *v as usize }).collect()),
        _ => None,
    }
}

/// A tensor's elements as `f64` (`None` for a type that is not a number).
pub fn values_f64(tensor: &Tensor) -> Option<Vec<f64>> {
    fn all<T: fabric_types::dtype::Element + Copy>(t: &Tensor, f: impl Fn(T) -> f64) -> Option<Vec<f64>> {
        t.as_slice::<T>().ok().map(|s| s.iter().map(|v| f(*v)).collect())
    }
    match tensor.dtype() {
        DataType::Fp32 => all(tensor, |v: f32| f64::from(v)),
        DataType::Fp64 => all(tensor, |v: f64| v),
        DataType::Int64 => all(tensor, |v: i64| v as f64),
        DataType::Int32 => all(tensor, |v: i32| f64::from(v)),
        DataType::Int16 => all(tensor, |v: i16| f64::from(v)),
        DataType::Int8 => all(tensor, |v: i8| f64::from(v)),
        DataType::Uint8 => all(tensor, |v: u8| f64::from(v)),
        DataType::Uint16 => all(tensor, |v: u16| f64::from(v)),
        DataType::Uint32 => all(tensor, |v: u32| f64::from(v)),
        DataType::Uint64 => all(tensor, |v: u64| v as f64),
        _ => None,
    }
}

impl DriftCounts {
    /// Counts every row of an input tensor (each row flattened into the reference's features).
    pub fn add_tensor(&mut self, reference: &Reference, tensor: &Tensor) {
        let rows = tensor.shape().first().copied().unwrap_or(0);
        let per_row = if rows == 0 { 0 } else { tensor.len() / rows };
        if per_row == 0 {
            return;
        }
        // FP32, what most models take, is read in place; other types through a copy.
        if let (DataType::Fp32, Ok(values)) = (tensor.dtype(), tensor.as_slice::<f32>()) {
            for row in values.chunks_exact(per_row) {
                self.add_row(reference, row.iter().map(|v| f64::from(*v)));
            }
        } else if let Some(values) = values_f64(tensor) {
            for row in values.chunks_exact(per_row) {
                self.add_row(reference, row.iter().copied());
            }
        }
    }
}

/// The bin a value falls in: the number of edges below it (NaN goes to the first bin).
pub fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|e| *e < x)
}

/// The distinct inner quantile edges of a sorted column, for `bins` bins.
fn quantile_edges(sorted: &[f64], bins: usize) -> Vec<f64> {
    let mut edges: Vec<f64> = Vec::with_capacity(bins.saturating_sub(1));
    if sorted.is_empty() {
        return edges;
    }
    for i in 1..bins {
        // Linear interpolation between the closest ranks (numpy's default).
        let pos = (sorted.len() - 1) as f64 * i as f64 / bins as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let edge = sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64);
        if edges.last().is_none_or(|last| edge > *last) {
            edges.push(edge);
        }
    }
    edges
}

/// The population stability index of `live` against `reference` (counts per bin), or `None` when
/// either is empty or they differ in length.
pub fn psi(reference: &[u64], live: &[u64]) -> Option<f64> {
    let (p, q) = proportions(reference, live)?;
    Some(
        p.iter()
            .zip(&q)
            .map(|(p, q)| {
                let (p, q) = (p.max(PSI_FLOOR), q.max(PSI_FLOOR));
                (q - p) * (q / p).ln()
            })
            .sum(),
    )
}

/// The Jensen-Shannon distance (base 2, 0 to 1) between the two binned distributions, less the
/// divergence expected from sampling alone when nothing drifted ((bins - 1) (1/n + 1/m) / 8 nats,
/// bins counted where either has rows), or `None` when either is empty or they differ in length.
pub fn js_distance(reference: &[u64], live: &[u64]) -> Option<f64> {
    let (p, q) = proportions(reference, live)?;
    let kl = |a: &[f64], m: &[f64]| -> f64 {
        a.iter().zip(m).filter(|(a, _)| **a > 0.0).map(|(a, m)| a * (a / m).ln()).sum()
    };
    let m: Vec<f64> = p.iter().zip(&q).map(|(p, q)| (p + q) / 2.0).collect();
    let divergence = (kl(&p, &m) + kl(&q, &m)) / 2.0;
    let (n, k) = (reference.iter().sum::<u64>() as f64, live.iter().sum::<u64>() as f64);
    let occupied = reference.iter().zip(live).filter(|(a, b)| **a + **b > 0).count();
    let expected = occupied.saturating_sub(1) as f64 * (1.0 / n + 1.0 / k) / 8.0;
    Some(((divergence - expected).max(0.0) / std::f64::consts::LN_2).sqrt().min(1.0))
}

fn proportions(reference: &[u64], live: &[u64]) -> Option<(Vec<f64>, Vec<f64>)> {
    let (n, k) = (reference.iter().sum::<u64>(), live.iter().sum::<u64>());
    if n == 0 || k == 0 || reference.len() != live.len() {
        return None;
    }
    let share = |c: &[u64], total: u64| c.iter().map(|&x| x as f64 / total as f64).collect();
    Some((share(reference, n), share(live, k)))
}

/// PSI's rule of thumb: `none` under 0.1, `moderate` to 0.25, `significant` above.
pub fn psi_band(psi: f64) -> &'static str {
    if psi < 0.1 {
        "none"
    } else if psi <= 0.25 {
        "moderate"
    } else {
        "significant"
    }
}

/// When drift is called.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftSettings {
    /// A feature (or the predictions) drifted when its corrected Jensen-Shannon distance reaches this.
    pub threshold: f64,
    /// Fewest live rows before anything is judged.
    pub min_rows: u64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings { threshold: 0.1, min_rows: 100 }
    }
}

/// The two scores of one feature or of the predictions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Population stability index.
    pub psi: f64,
    /// Corrected Jensen-Shannon distance (what flags drift).
    pub js: f64,
    /// Whether it drifted.
    pub drifted: bool,
}

/// One feature's scores.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureScore {
    /// Feature index (position in the flattened row).
    pub feature: usize,
    /// Its scores.
    #[serde(flatten)]
    pub score: Score,
}

/// The verdict over a version's live counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Live rows counted.
    pub rows: u64,
    /// `not_enough_data`, `none` or `drift`.
    pub verdict: String,
    /// Every feature's scores, the most drifted first.
    pub features: Vec<FeatureScore>,
    /// Features that drifted.
    pub drifted_features: usize,
    /// The predictions' scores, when the reference has them.
    pub prediction: Option<Score>,
}

/// Scores every feature and the predictions of `live` against `reference`.
pub fn judge(reference: &Reference, live: &DriftCounts, settings: &DriftSettings) -> Judgement {
    let enough = live.rows >= settings.min_rows;
    let score = |r: &[u64], l: &[u64]| -> Option<Score> {
        let (psi, js) = (psi(r, l)?, js_distance(r, l)?);
        Some(Score { psi, js, drifted: enough && js >= settings.threshold })
    };
    let mut features: Vec<FeatureScore> = reference
        .counts
        .iter()
        .zip(&live.features)
        .enumerate()
        .filter_map(|(feature, (r, l))| score(r, l).map(|score| FeatureScore { feature, score }))
        .collect();
    features.sort_by(|a, b| b.score.js.total_cmp(&a.score.js).then(b.score.psi.total_cmp(&a.score.psi)));
    let prediction = reference.prediction.as_ref().and_then(|p| {
        let mut r = p.classes.clone();
        r.push(0);
        score(&r, &live.classes)
    });
    let drifted_features = features.iter().filter(|f| f.score.drifted).count();
    let verdict = if !enough {
        "not_enough_data"
    } else if drifted_features > 0 || prediction.is_some_and(|p| p.drifted) {
        "drift"
    } else {
        "none"
    };
    Judgement { rows: live.rows, verdict: verdict.to_string(), features, drifted_features, prediction }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_edges_merge_repeated_values() {
        let cases: [(&[f64], usize, &[f64]); 4] = [
            (&[0.0, 1.0, 2.0, 3.0, 4.0], 4, &[1.0, 2.0, 3.0]),
            (&[0.0; 20], 10, &[0.0]),
            (&[0.0, 0.0, 0.0, 0.0, 1.0], 2, &[0.0]),
            (&[], 10, &[]),
        ];
        for (sorted, bins, want) in cases {
            assert_eq!(quantile_edges(sorted, bins), want, "{sorted:?}");
        }
    }

    #[test]
    fn bins_count_values_at_an_edge_below_it() {
        let edges = [0.0, 0.5];
        for (x, want) in [(-1.0, 0), (0.0, 0), (0.1, 1), (0.5, 1), (0.6, 2), (f64::NAN, 0)] {
            assert_eq!(bin_of(&edges, x), want, "{x}");
        }
    }

    #[test]
    fn a_reference_bins_its_own_sample() {
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        let r = Reference::from_sample("x", 50, 2, &values, 5).expect("reference");
        assert_eq!(r.rows, 50);
        assert_eq!(r.counts.len(), 2);
        assert!(r.counts.iter().all(|c| c.len() == 5 && c.iter().sum::<u64>() == 50), "{:?}", r.counts);
        let errors = [
            (Reference::from_sample("x", 0, 2, &[], 5), DriftError::Empty { rows: 0, features: 2 }),
            (Reference::from_sample("x", 2, 2, &[1.0], 5), DriftError::Shape { values: 1, rows: 2, features: 2 }),
            (Reference::from_sample("x", 1, 2000, &[0.0; 2000], 5), DriftError::TooManyFeatures(2000)),
        ];
        for (got, want) in errors {
            assert_eq!(got, Err(want));
        }
    }

    #[test]
    fn scores_grow_with_the_shift_not_with_the_sample() {
        // (reference, live, psi band, drifted at 0.1)
        let cases: [(&[u64], &[u64], &str, bool); 5] = [
            (&[100, 100, 100, 100], &[100, 100, 100, 100], "none", false),
            // The same proportions, 1,000 times the rows: still nothing.
            (&[100, 100, 100, 100], &[100_000, 100_000, 100_000, 100_000], "none", false),
            // A small shift in small samples: within sampling noise.
            (&[25, 25, 25, 25], &[30, 22, 24, 24], "none", false),
            (&[100, 100, 100, 100], &[160, 120, 80, 40], "moderate", true),
            (&[100, 100, 100, 100], &[0, 0, 0, 400], "significant", true),
        ];
        for (r, l, band, drifted) in cases {
            let (p, js) = (psi(r, l).expect("psi"), js_distance(r, l).expect("js"));
            assert_eq!(psi_band(p), band, "{r:?} {l:?}: psi {p}");
            assert_eq!(js >= 0.1, drifted, "{r:?} {l:?}: js {js}");
        }
        assert_eq!(psi(&[1, 2], &[0, 0]), None);
        assert_eq!(js_distance(&[1, 2], &[1, 2, 3]), None);
    }

    #[test]
    fn judging_flags_the_shifted_feature_and_the_predictions() {
        // Feature 0 uniform on 0..100, feature 1 too; predictions half class 0, half class 1.
        let values: Vec<f64> = (0..1000).flat_map(|i| [f64::from(i % 100), f64::from((i * 7) % 100)]).collect();
        let predicted: Vec<usize> = (0..1000).map(|i| i % 2).collect();
        let r =
            Reference::from_sample("x", 1000, 2, &values, 10).expect("reference").with_predictions("label", &predicted);
        let settings = DriftSettings::default();
        let mut same = r.empty_counts();
        let mut shifted = r.empty_counts();
        for i in 0..500u32 {
            same.add_row(&r, [f64::from(i % 100), f64::from((i * 3) % 100)].into_iter());
            same.add_class(i as usize % 2);
            shifted.add_row(&r, [f64::from(i % 100) + 50.0, f64::from((i * 3) % 100)].into_iter());
            shifted.add_class(if i % 5 == 0 { 1 } else { 0 });
        }
        let j = judge(&r, &same, &settings);
        assert_eq!((j.verdict.as_str(), j.drifted_features), ("none", 0), "{j:?}");
        let j = judge(&r, &shifted, &settings);
        assert_eq!(j.verdict, "drift");
        assert_eq!(j.drifted_features, 1);
        assert_eq!(j.features[0].feature, 0);
        assert!(j.prediction.is_some_and(|p| p.drifted), "{j:?}");
        // Too few rows: nothing judged.
        let mut few = r.empty_counts();
        few.add_row(&r, [500.0, 500.0].into_iter());
        assert_eq!(judge(&r, &few, &settings).verdict, "not_enough_data");
        // An unseen class lands in the last slot; counts of another shape do not merge.
        let mut c = r.empty_counts();
        c.add_class(7);
        assert_eq!(c.classes, [0, 0, 1]);
        assert!(!c.merge(&DriftCounts::default()));
        assert!(c.merge(&shifted));
        assert_eq!(c.rows, 500);
    }

    #[test]
    fn the_class_output_is_a_label_else_scores() {
        let (i, f) = (DataType::Int64, DataType::Fp32);
        let cases: [(&[(&str, DataType, &[i64])], Option<usize>); 5] = [
            (&[("label", i, &[-1]), ("probabilities", f, &[-1, 10])], Some(0)),
            (&[("probabilities", f, &[-1, 10]), ("label", i, &[-1, 1])], Some(1)),
            (&[("scores", f, &[-1, 3])], Some(0)),
            (&[("y", f, &[-1, 1]), ("z", f, &[-1])], None),
            (&[], None),
        ];
        for (outputs, want) in cases {
            assert_eq!(class_output(outputs), want, "{outputs:?}");
        }
        let scores = Tensor::from_vec(vec![2, 3], vec![0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2]).expect("tensor");
        assert_eq!(classes_of(&scores), Some(vec![1, 0]));
        let labels = Tensor::from_vec(vec![3], vec![4i64, 0, -1]).expect("tensor");
        assert_eq!(classes_of(&labels), Some(vec![4, 0, usize::MAX]));
        let flat = Tensor::from_vec(vec![2], vec![0.5f32, 0.1]).expect("tensor");
        assert_eq!(classes_of(&flat), None);
    }
}
