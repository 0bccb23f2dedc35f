//! Cascades: a small model answers on the edge when it is confident, and a request it is not
//! confident about goes to a big model on a hub. Pure: the confidence of each row from the small
//! model's scores, and whether a request escalates.

use serde::{Deserialize, Serialize};

/// Why a cascade cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CascadeError {
    /// The threshold is not a number.
    #[error("a cascade's threshold must be a finite number, got {0}")]
    Threshold(String),
}

/// How confident a row's scores are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// The highest score (a probability, for a classifier's probabilities).
    #[default]
    Top1,
    /// The highest score less the second highest.
    Margin,
}

/// A cascade from a model on this edge to a bigger one on the hubs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cascade {
    /// The model on the hubs that takes what the small one is not confident about.
    pub to: String,
    /// The small model's output holding each row's scores (`[N, C]`); default: its first output of
    /// floating-point scores per row.
    #[serde(default)]
    pub output: Option<String>,
    /// Escalate a request when any of its rows is less confident than this.
    pub threshold: f64,
    /// How confidence is read from the scores.
    #[serde(default)]
    pub measure: Measure,
}

// Thresholds are finite ([`Cascade::check`] where a cascade is taken), so equality is total.
impl Eq for Cascade {}

impl Cascade {
    /// Refuses a threshold that is not a finite number.
    pub fn check(&self) -> Result<(), CascadeError> {
        if self.threshold.is_finite() {
            Ok(())
        } else {
            Err(CascadeError::Threshold(self.threshold.to_string()))
        }
    }
}

/// The confidence of one row's scores (`None` for an empty row).
pub fn confidence(scores: &[f64], measure: Measure) -> Option<f64> {
    let mut top = f64::NEG_INFINITY;
    let mut second = f64::NEG_INFINITY;
    for &s in scores {
        if s > top {
            second = top;
            top = s;
        } else if s > second {
            second = s;
        }
    }
    if scores.is_empty() {
        return None;
    }
    Some(match measure {
        Measure::Top1 => top,
        Measure::Margin if scores.len() == 1 => top,
        Measure::Margin => top - second,
    })
}

/// Whether a request escalates: some row's confidence is under the threshold (a row without scores
/// counts as not confident).
pub fn escalates(scores: &[f64], per_row: usize, cascade: &Cascade) -> bool {
    if per_row == 0 {
        return true;
    }
    scores.chunks(per_row).any(|row| confidence(row, cascade.measure).is_none_or(|c| c < cascade.threshold))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_by_measure() {
        let cases: [(&[f64], Measure, Option<f64>); 6] = [
            (&[0.1, 0.7, 0.2], Measure::Top1, Some(0.7)),
            (&[0.1, 0.7, 0.2], Measure::Margin, Some(0.5)),
            (&[0.5, 0.5], Measure::Margin, Some(0.0)),
            (&[0.9], Measure::Margin, Some(0.9)),
            (&[], Measure::Top1, None),
            (&[-2.0, -1.0], Measure::Top1, Some(-1.0)),
        ];
        for (scores, measure, want) in cases {
            let got = confidence(scores, measure);
            assert!(
                match (got, want) {
                    (Some(a), Some(b)) => (a - b).abs() < 1e-12,
                    (a, b) => a == b,
                },
                "{scores:?} {measure:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_request_escalates_when_any_row_is_unsure() {
        let c = Cascade { to: "big".into(), output: None, threshold: 0.8, measure: Measure::Top1 };
        let cases: [(&[f64], usize, bool); 5] = [
            (&[0.9, 0.1], 2, false),
            (&[0.6, 0.4], 2, true),
            (&[0.9, 0.1, 0.55, 0.45], 2, true),
            (&[0.8, 0.2], 2, false),
            (&[], 0, true),
        ];
        for (scores, per_row, want) in cases {
            assert_eq!(escalates(scores, per_row, &c), want, "{scores:?}");
        }
    }
}
