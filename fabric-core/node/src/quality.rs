//! What one version's answers say about its model's quality, for the load report: its inputs and
//! predicted classes counted into the bins of its reference statistics (drift), the predicted class
//! of each answered request kept by request id for a while, and the labels clients send back for
//! them (live accuracy).
//!
//! Counts go into drift windows of [`WINDOW`]; the report carries the current and the previous
//! window together, so it never starts from nothing when a window turns. A request costs one pass
//! over its rows, read in place (a binary search per feature in at most nine edges), and its
//! predicted classes, each under a short lock; a version without a reference and a request without
//! an id cost a read lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use fabric_engine::TensorSpec;
use fabric_policy::drift::{self, DriftCounts, Reference};
use fabric_proto::report::{DriftReport, FeedbackReport};
use fabric_types::tensor::NamedTensor;

/// Length of one drift window.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Request ids whose predictions are kept for feedback (the oldest are forgotten first).
pub const REMEMBERED: usize = 100_000;

/// Why feedback for one request was not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// The labels do not match the request's rows.
    #[error("request '{id}' had {rows} row(s) but {labels} label(s) came")]
    Rows { id: String, rows: usize, labels: usize },
}

/// The quality statistics of one model version.
pub struct Quality {
    /// The output classes are read from without a reference (or when it names none).
    default_output: Option<usize>,
    outputs: Vec<String>,
    started: Instant,
    reference: RwLock<Option<Arc<Watched>>>,
    windows: Mutex<Windows>,
    predictions: Mutex<Predictions>,
}

/// A reference being counted against.
struct Watched {
    digest: String,
    stats: Reference,
    class_output: Option<usize>,
}

#[derive(Default)]
struct Windows {
    index: u64,
    current: Window,
    previous: Window,
}

#[derive(Default, Clone)]
struct Window {
    drift: Option<DriftCounts>,
    labelled: u64,
    correct: u64,
}

#[derive(Default)]
struct Predictions {
    by_id: HashMap<String, Vec<usize>>,
    order: VecDeque<String>,
}

impl Quality {
    /// Statistics for a version with these outputs (the class output is chosen by
    /// [`drift::class_output`] until a reference names one).
    pub fn new(outputs: &[TensorSpec]) -> Quality {
        let specs: Vec<(&str, fabric_types::DataType, &[i64])> =
            outputs.iter().map(|o| (o.name.as_str(), o.datatype, o.shape.as_slice())).collect();
        Quality {
            default_output: drift::class_output(&specs),
            outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            started: Instant::now(),
            reference: RwLock::new(None),
            windows: Mutex::new(Windows::default()),
            predictions: Mutex::new(Predictions::default()),
        }
    }

    /// Counts against `stats` (fetched by `digest`) from now on; counts against another reference
    /// are dropped.
    pub fn set_reference(&self, digest: &str, stats: Reference) {
        let class_output = match &stats.prediction {
            Some(p) => self.outputs.iter().position(|o| *o == p.output),
            None => self.default_output,
        };
        let watched = Arc::new(Watched { digest: digest.to_string(), stats, class_output });
        *self.reference.write().unwrap_or_else(PoisonError::into_inner) = Some(watched);
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        windows.current.drift = None;
        windows.previous.drift = None;
    }

    /// The digest of the reference counted against, if any.
    pub fn reference_digest(&self) -> Option<String> {
        self.watched().map(|w| w.digest.clone())
    }

    /// Counts a valid request's input features into the current window, when a reference is set
    /// (before it is served: its inputs go on to the pool without a copy).
    pub fn observe_inputs(&self, now: Instant, inputs: &[NamedTensor]) {
        let Some(w) = self.watched() else { return };
        let Some(input) = inputs.iter().find(|t| t.name == w.stats.input) else { return };
        let mut windows = self.turned(now);
        windows.current.drift.get_or_insert_with(|| w.stats.empty_counts()).add_tensor(&w.stats, &input.tensor);
    }

    fn watched(&self) -> Option<Arc<Watched>> {
        self.reference.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Counts an answered request's predicted classes, and (when it has an id) remembers them for
    /// feedback.
    pub fn observe(&self, now: Instant, id: Option<&str>, outputs: &[NamedTensor]) {
        let watched = self.watched();
        // Nothing to count and nothing to remember: the common case costs one read lock.
        if watched.is_none() && id.is_none() {
            return;
        }
        let class_output = watched.as_ref().map_or(self.default_output, |w| w.class_output);
        let classes = class_output.and_then(|i| outputs.get(i)).and_then(|o| drift::classes_of(&o.tensor));
        if let (Some(w), Some(classes)) = (&watched, &classes) {
            let mut windows = self.turned(now);
            let counts = windows.current.drift.get_or_insert_with(|| w.stats.empty_counts());
            for c in classes {
                counts.add_class(*c);
            }
        }
        if let (Some(id), Some(classes)) = (id, classes) {
            let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
            if p.by_id.insert(id.to_string(), classes).is_none() {
                p.order.push_back(id.to_string());
            }
            while p.order.len() > REMEMBERED {
                if let Some(old) = p.order.pop_front() {
                    p.by_id.remove(&old);
                }
            }
        }
    }

    /// Whether a prediction is kept for request `id`.
    pub fn knows(&self, id: &str) -> bool {
        self.predictions.lock().unwrap_or_else(PoisonError::into_inner).by_id.contains_key(id)
    }

    /// Counts the true `labels` (one per row) of request `id`: `Ok(Some(correct))`, `Ok(None)` when
    /// no prediction is kept for it (unknown, forgotten or labelled already).
    pub fn feedback(&self, now: Instant, id: &str, labels: &[i64]) -> Result<Option<u64>, FeedbackError> {
        let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(classes) = p.by_id.get(id) else { return Ok(None) };
        if classes.len() != labels.len() {
            return Err(FeedbackError::Rows { id: id.to_string(), rows: classes.len(), labels: labels.len() });
        }
        let correct =
            classes.iter().zip(labels).filter(|(c, l)| usize::try_from(**l).is_ok_and(|l| l == **c)).count() as u64;
        p.by_id.remove(id);
        drop(p);
        let mut windows = self.turned(now);
        windows.current.labelled += labels.len() as u64;
        windows.current.correct += correct;
        Ok(Some(correct))
    }

    /// The drift counts of the current and previous window, when a reference is set.
    pub fn drift_report(&self, now: Instant) -> Option<DriftReport> {
        let watched = self.watched()?;
        let windows = self.turned(now);
        let mut counts = watched.stats.empty_counts();
        for w in [&windows.previous, &windows.current] {
            if let Some(c) = &w.drift {
                counts.merge(c);
            }
        }
        Some(DriftReport { reference: watched.digest.clone(), window_s: WINDOW.as_secs(), counts })
    }

    /// The feedback of the current and previous window, when any came.
    pub fn feedback_report(&self, now: Instant) -> Option<FeedbackReport> {
        let windows = self.turned(now);
        let labelled = windows.previous.labelled + windows.current.labelled;
        let correct = windows.previous.correct + windows.current.correct;
        (labelled > 0).then_some(FeedbackReport { labelled, correct })
    }

    /// The windows, turned to `now`'s.
    fn turned(&self, now: Instant) -> std::sync::MutexGuard<'_, Windows> {
        let index = (now.saturating_duration_since(self.started).as_secs() / WINDOW.as_secs().max(1)) as u64;
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if index > windows.index {
            let last = std::mem::take(&mut windows.current);
            windows.previous = if index == windows.index + 1 { last } else { Window::default() };
            windows.index = index;
        }
        windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_types::tensor::Tensor;
    use fabric_types::DataType;

    fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype, shape: shape.to_vec(), leading: None }
    }

    fn answer(label: i64) -> Vec<NamedTensor> {
        let scores = Tensor::from_vec(vec![1, 2], vec![0.5f32, 0.5]).expect("tensor");
        let label = Tensor::from_vec(vec![1], vec![label]).expect("tensor");
        vec![NamedTensor::new("scores", scores), NamedTensor::new("label", label)]
    }

    #[test]
    fn feedback_counts_each_request_once_and_by_its_rows() {
        let q = Quality::new(&[spec("scores", DataType::Fp32, &[-1, 2]), spec("label", DataType::Int64, &[-1])]);
        let now = Instant::now();
        q.observe(now, Some("a"), &answer(1));
        q.observe(now, Some("b"), &answer(0));
        q.observe(now, None, &answer(0));
        assert_eq!(q.feedback(now, "a", &[1]), Ok(Some(1)));
        assert_eq!(q.feedback(now, "a", &[1]), Ok(None), "labelled twice");
        assert_eq!(q.feedback(now, "b", &[1]), Ok(Some(0)));
        assert_eq!(q.feedback(now, "zz", &[1]), Ok(None));
        assert_eq!(q.feedback_report(now), Some(FeedbackReport { labelled: 2, correct: 1 }));
        q.observe(now, Some("c"), &answer(3));
        assert!(matches!(q.feedback(now, "c", &[3, 3]), Err(FeedbackError::Rows { rows: 1, labels: 2, .. })));
        // Two windows on, the feedback above is gone from the report.
        assert_eq!(q.feedback_report(now + WINDOW * 2), None);
    }

    #[test]
    fn drift_counts_follow_the_reference_and_the_windows() {
        let q = Quality::new(&[spec("label", DataType::Int64, &[-1])]);
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        let reference =
            Reference::from_sample("x", 100, 1, &values, 4).expect("reference").with_predictions("label", &[0, 1]);
        let now = Instant::now();
        q.observe(now, None, &answer(0)[1..]);
        assert!(q.drift_report(now).is_none(), "no reference yet");
        q.set_reference("d1", reference);
        let x = NamedTensor::new("x", Tensor::from_vec(vec![2, 1], vec![5.0f32, 95.0]).expect("tensor"));
        q.observe_inputs(now, std::slice::from_ref(&x));
        q.observe(now, None, &answer(1)[1..]);
        let report = q.drift_report(now).expect("report");
        assert_eq!((report.reference.as_str(), report.counts.rows), ("d1", 2));
        assert_eq!(report.counts.classes, [0, 1, 0]);
        assert_eq!(report.counts.features[0], [1, 0, 0, 1]);
        // The next window still reports it; the one after does not.
        assert_eq!(q.drift_report(now + WINDOW).map(|r| r.counts.rows), Some(2));
        assert_eq!(q.drift_report(now + WINDOW * 3).map(|r| r.counts.rows), Some(0));
    }
}
