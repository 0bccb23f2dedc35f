//! Reference samples for drift: a sample of a version's inputs (`.npy`, or `.npz` as numpy's
//! `savez` writes it) binned into the version's reference statistics, with the model's own
//! predictions on it (run here with tract); the drift view, the nodes' live counts merged per
//! version and judged against those statistics; and both, with live accuracy, as Prometheus metrics.

use std::io::Read;

use fabric_engine::{EngineKind, EngineOptions};
use fabric_policy::drift::{self, DriftSettings, Judgement, Reference};
use fabric_proto::answers::VersionReference;
use fabric_types::tensor::{NamedTensor, Tensor};
use fabric_types::DataType;
use serde::{Deserialize, Serialize};

use super::views::window;
use super::*;

/// Largest reference sample taken.
pub const MAX_SAMPLE_BYTES: u64 = 64 << 20;

/// A sample as read from its file: shape (rows first) and values, row-major.
#[derive(Debug, PartialEq)]
pub struct Sample {
    /// The array's name in an `.npz` (`None` for an `.npy`).
    pub array: Option<String>,
    /// Its shape, rows first.
    pub shape: Vec<usize>,
    /// Its values.
    pub values: Vec<f64>,
}

/// A model's drift, per version with a reference.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DriftView {
    /// Model name.
    pub name: String,
    /// Per version with reference statistics.
    pub versions: Vec<VersionDrift>,
}

/// One version's drift over the nodes' counts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VersionDrift {
    /// Version.
    pub version: u64,
    /// Rows in its reference sample.
    pub reference_rows: u64,
    /// The input its features are read from.
    pub input: String,
    /// The output its predictions are read from.
    pub prediction_output: Option<String>,
    /// Nodes whose counts are in.
    pub nodes: usize,
    /// The scores, the most drifted features first (all of them).
    #[serde(flatten)]
    pub judgement: Judgement,
}

impl Registry {
    /// Sets `name:version`'s reference statistics from the sample of `size` bytes on `recv`.
    pub(super) async fn set_reference(
        &self,
        name: &str,
        version: u64,
        size: u64,
        input: Option<String>,
        output: Option<String>,
        recv: &mut quinn::RecvStream,
    ) -> Reply {
        let model = self.state().models.get(name).and_then(|v| v.get(&version)).cloned();
        let Some(model) = model else {
            let _ = recv.stop(0u32.into());
            return Err(Refusal::new("not_found", format!("no model version {name}:{version}: push it first")));
        };
        if size > MAX_SAMPLE_BYTES {
            let _ = recv.stop(0u32.into());
            return Err(Refusal::new(
                "too_large",
                format!("a reference sample of {size} bytes is over the {MAX_SAMPLE_BYTES}-byte limit: send fewer rows (a few thousand are plenty)"),
            ));
        }
        let bytes = receive_bytes(recv, size).await?;
        let path = self.store.blob_path(&model.digest);
        let stats = tokio::task::spawn_blocking(move || reference_of(&model, &path, &bytes, input, output))
            .await
            .map_err(internal)?
            .map_err(|e| Refusal::new("invalid", e))?;
        let reference = VersionReference::new(stats);
        self.transition(|state| {
            let m = state
                .models
                .get_mut(name)
                .and_then(|v| v.get_mut(&version))
                .ok_or_else(|| Refusal::new("not_found", format!("{name}:{version} was removed meanwhile")))?;
            m.reference = Some(reference.clone());
            Ok(json!({
                "name": name,
                "version": version,
                "digest": reference.digest,
                "rows": reference.stats.rows,
                "features": reference.stats.features(),
                "input": reference.stats.input,
                "prediction_output": reference.stats.prediction.as_ref().map(|p| p.output.clone()),
                "classes": reference.stats.prediction.as_ref().map(|p| p.classes.clone()),
            }))
        })
    }

    /// The reference statistics with this digest, as nodes fetch them.
    pub(super) fn reference_bytes(&self, digest: &str) -> Option<Vec<u8>> {
        let state = self.state();
        let found = state
            .models
            .values()
            .flat_map(|v| v.values())
            .find_map(|m| m.reference.as_ref().filter(|r| r.digest == digest));
        found.map(VersionReference::bytes)
    }

    /// Every version's drift and live accuracy over the fleet, in Prometheus' text format: what the
    /// status page's `/metrics` serves (docs/metrics.md lists them).
    pub fn quality_metrics(&self) -> String {
        use prometheus::{Encoder, GaugeVec, Opts, Registry as Metrics, TextEncoder};
        let metrics = Metrics::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Option<GaugeVec> {
            let g = GaugeVec::new(Opts::new(format!("fabric_{name}"), help), labels).ok()?;
            metrics.register(Box::new(g.clone())).ok()?;
            Some(g)
        };
        let mv = &["model", "version"];
        let rows = gauge("drift_rows", "Live rows in the nodes' drift windows (5-10 minutes)", mv);
        let drifted =
            gauge("drift_features_drifted", "Features whose corrected Jensen-Shannon distance is 0.1 or more", mv);
        let max_js = gauge("drift_max_js_distance", "The largest corrected Jensen-Shannon distance of any feature", mv);
        let feature_js = gauge(
            "drift_feature_js_distance",
            "Corrected Jensen-Shannon distance of the 5 most drifted features",
            &["model", "version", "feature"],
        );
        let feature_psi =
            gauge("drift_feature_psi", "PSI of the 5 most drifted features", &["model", "version", "feature"]);
        let prediction_js =
            gauge("drift_prediction_js_distance", "Corrected Jensen-Shannon distance of the predicted classes", mv);
        let prediction_psi = gauge("drift_prediction_psi", "PSI of the predicted classes", mv);
        let labelled = gauge("feedback_labelled", "Rows labelled by feedback in the nodes' windows (5-10 minutes)", mv);
        let accuracy = gauge("live_accuracy_ratio", "Share of labelled rows answered right (0-1)", mv);
        let (state, timeout) = (self.state(), self.settings.heartbeat_timeout);
        for (name, versions) in &state.models {
            for &v in versions.keys() {
                let w = window(&self.fleet, name, v, timeout);
                let version = v.to_string();
                let labels = [name.as_str(), version.as_str()];
                if let (Some(g), Some(a)) = (&accuracy, w.accuracy_pct()) {
                    g.with_label_values(&labels).set(a / 100.0);
                }
                if let Some(g) = &labelled {
                    g.with_label_values(&labels).set(w.labelled as f64);
                }
            }
            let Ok(view) = self.drift(name) else { continue };
            for d in &view.versions {
                let version = d.version.to_string();
                let labels = [name.as_str(), version.as_str()];
                let j = &d.judgement;
                let set = |g: &Option<GaugeVec>, value: f64| {
                    if let Some(g) = g {
                        g.with_label_values(&labels).set(value);
                    }
                };
                set(&rows, j.rows as f64);
                set(&drifted, j.drifted_features as f64);
                set(&max_js, j.features.first().map_or(0.0, |f| f.score.js));
                if let Some(p) = j.prediction {
                    set(&prediction_js, p.js);
                    set(&prediction_psi, p.psi);
                }
                for f in j.features.iter().take(5) {
                    let feature = f.feature.to_string();
                    let labels = [name.as_str(), version.as_str(), feature.as_str()];
                    if let (Some(js), Some(psi)) = (&feature_js, &feature_psi) {
                        js.with_label_values(&labels).set(f.score.js);
                        psi.with_label_values(&labels).set(f.score.psi);
                    }
                }
            }
        }
        let mut text = Vec::new();
        let _ = TextEncoder::new().encode(&metrics.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }

    /// `name`'s drift per version with a reference, over the counts of the nodes that serve it.
    pub(super) fn drift(&self, name: &str) -> Result<DriftView, Refusal> {
        let state = self.state();
        let versions = state.models.get(name).ok_or_else(|| {
            Refusal::new("not_found", format!("no model '{name}': `fabric model list` shows the models"))
        })?;
        let timeout = self.settings.heartbeat_timeout;
        let settings = DriftSettings::default();
        let mut out = Vec::new();
        for m in versions.values() {
            let Some(reference) = &m.reference else { continue };
            let mut counts = reference.stats.empty_counts();
            let mut nodes = 0usize;
            self.fleet.each(|n| {
                if !n.is_up(timeout) {
                    return;
                }
                let Some(live) = n.report.version(name, m.version).and_then(|v| v.drift.as_ref()) else { return };
                if live.reference == reference.digest && counts.merge(&live.counts) {
                    nodes += 1;
                }
            });
            out.push(VersionDrift {
                version: m.version,
                reference_rows: reference.stats.rows,
                input: reference.stats.input.clone(),
                prediction_output: reference.stats.prediction.as_ref().map(|p| p.output.clone()),
                nodes,
                judgement: drift::judge(&reference.stats, &counts, &settings),
            });
        }
        Ok(DriftView { name: name.to_string(), versions: out })
    }
}

/// Reads exactly `size` bytes from the stream into memory.
async fn receive_bytes(recv: &mut quinn::RecvStream, size: u64) -> Result<Vec<u8>, Refusal> {
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = super::upload::next_chunk(recv).await? {
        if bytes.len() as u64 + chunk.bytes.len() as u64 > size {
            return Err(Refusal::new("invalid", format!("the upload sent more than the {size} bytes it announced")));
        }
        bytes.extend_from_slice(&chunk.bytes);
    }
    if bytes.len() as u64 != size {
        return Err(Refusal::new(
            "invalid",
            format!("the upload was truncated: {} of {size} bytes arrived", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// The reference statistics of `model` from a sample file's bytes (blocking: it runs the model).
fn reference_of(
    model: &ModelVersion,
    path: &Path,
    bytes: &[u8],
    input: Option<String>,
    output: Option<String>,
) -> Result<Reference, String> {
    let spec = match &input {
        Some(want) => model.inputs.iter().find(|i| &i.name == want).ok_or_else(|| {
            let names: Vec<&str> = model.inputs.iter().map(|i| i.name.as_str()).collect();
            format!("the model has no input '{want}' (its inputs: {names:?})")
        })?,
        None => model.inputs.first().ok_or("the model declares no inputs")?,
    };
    let sample = read_sample(bytes, &spec.name)?;
    let rows = *sample.shape.first().ok_or("the sample is a scalar: it needs rows")?;
    let row_shape = &sample.shape[1..];
    let declared = spec.shape.get(1..).unwrap_or(&[]);
    let fits =
        declared.len() == row_shape.len() && declared.iter().zip(row_shape).all(|(d, s)| *d < 0 || *d as usize == *s);
    if !fits {
        return Err(format!(
            "the sample's rows have shape {row_shape:?} but input '{}' takes rows of {:?} (-1: any)",
            spec.name, declared
        ));
    }
    let features = row_shape.iter().product::<usize>();
    let reference = Reference::from_sample(&spec.name, rows, features, &sample.values, drift::DEFAULT_BINS)
        .map_err(|e| e.to_string())?;
    let outputs: Vec<(&str, DataType, &[i64])> =
        model.outputs.iter().map(|o| (o.name.as_str(), o.datatype, o.shape.as_slice())).collect();
    let class_output = match &output {
        Some(want) => Some(model.outputs.iter().position(|o| &o.name == want).ok_or_else(|| {
            let names: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
            format!("the model has no output '{want}' (its outputs: {names:?})")
        })?),
        None => drift::class_output(&outputs),
    };
    let Some(class_output) = class_output else { return Ok(reference) };
    // Only a single-input model can be run on a sample of one input.
    if model.inputs.len() != 1 || !matches!(spec.datatype, DataType::Fp32 | DataType::Fp64) {
        tracing::info!(model = %model.name, version = model.version, "reference without predictions: the model takes more than one input, or not floats");
        return Ok(reference);
    }
    let predicted = predict(path, spec, &sample, class_output)?;
    Ok(reference.with_predictions(&model.outputs[class_output].name, &predicted))
}

/// The model's predicted class for every sample row, run with tract in batches.
fn predict(
    path: &Path,
    spec: &fabric_proto::answers::TensorDecl,
    sample: &Sample,
    output: usize,
) -> Result<Vec<usize>, String> {
    let options = EngineOptions::default();
    let mut engine = fabric_engine::load(EngineKind::Tract, path, &options)
        .map_err(|e| format!("cannot run the model on the sample to count its predictions: {e}"))?;
    let rows = sample.shape[0];
    let per_row = sample.values.len() / rows.max(1);
    let batch = engine.max_batch_size().max(1);
    let mut predicted = Vec::with_capacity(rows);
    for (i, chunk) in sample.values.chunks(per_row * batch).enumerate() {
        let n = chunk.len() / per_row.max(1);
        let mut shape = vec![n];
        shape.extend_from_slice(&sample.shape[1..]);
        let tensor = match spec.datatype {
            DataType::Fp64 => Tensor::from_vec(shape, chunk.to_vec()),
            _ => Tensor::from_vec(shape, chunk.iter().map(|v| *v as f32).collect()),
        }
        .map_err(|e| e.to_string())?;
        let outputs = engine
            .infer(&[NamedTensor::new(spec.name.clone(), tensor)])
            .map_err(|e| format!("running the model on sample rows {}..: {e}", i * batch))?;
        let classes = outputs
            .get(output)
            .and_then(|o| drift::classes_of(&o.tensor))
            .ok_or("the class output gave no class per row (it needs a label per row, or scores [N, C])")?;
        predicted.extend(classes.into_iter().map(|c| c.min(drift::MAX_CLASSES)));
    }
    Ok(predicted)
}

/// Reads a sample file: an `.npy` array, or from an `.npz` the array named `input`, else its only
/// (or first) array.
pub fn read_sample(bytes: &[u8], input: &str) -> Result<Sample, String> {
    if bytes.starts_with(b"\x93NUMPY") {
        return read_npy(bytes, None);
    }
    if !bytes.starts_with(b"PK") {
        return Err("the sample is neither .npy nor .npz (numpy.save or numpy.savez write them)".into());
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("unreadable .npz: {e}"))?;
    let names: Vec<String> = archive.file_names().filter(|n| n.ends_with(".npy")).map(str::to_string).collect();
    let chosen = names
        .iter()
        .find(|n| n.strip_suffix(".npy") == Some(input))
        .or(names.first())
        .cloned()
        .ok_or("the .npz holds no arrays")?;
    let mut entry = archive.by_name(&chosen).map_err(|e| format!("unreadable .npz entry {chosen}: {e}"))?;
    let mut array = Vec::new();
    entry.read_to_end(&mut array).map_err(|e| format!("unreadable .npz entry {chosen}: {e}"))?;
    read_npy(&array, chosen.strip_suffix(".npy").map(str::to_string))
}

fn read_npy(bytes: &[u8], array: Option<String>) -> Result<Sample, String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("unreadable .npy: {e}"))?;
    let shape: Vec<usize> = npy.shape().iter().map(|d| *d as usize).collect();
    let kind = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => return Err(format!("the sample's dtype {other:?} is not a plain number type")),
    };
    let bad = |e: std::io::Error| format!("unreadable .npy data: {e}");
    let values: Vec<f64> = match kind.get(1..).unwrap_or("") {
        "f4" => npy.into_vec::<f32>().map_err(bad)?.into_iter().map(f64::from).collect(),
        "f8" => npy.into_vec::<f64>().map_err(bad)?,
        "i8" => npy.into_vec::<i64>().map_err(bad)?.into_iter().map(|v| v as f64).collect(),
        "i4" => npy.into_vec::<i32>().map_err(bad)?.into_iter().map(f64::from).collect(),
        "u1" => npy.into_vec::<u8>().map_err(bad)?.into_iter().map(f64::from).collect(),
        other => {
            return Err(format!(
                "the sample's dtype {other} is not taken: save it as float32, float64, int64, int32 or uint8"
            ))
        }
    };
    Ok(Sample { array, shape, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `.npy` file (version 1.0) of `descr` and `shape` holding `data`.
    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn samples_are_read_by_dtype_or_refused_with_the_reason() {
        let f4: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let i8s: Vec<u8> = [5i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let cases: [(Vec<u8>, Result<(Vec<usize>, Vec<f64>), &str>); 4] = [
            (npy("<f4", "(2, 2)", &f4), Ok((vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]))),
            (npy("<i8", "(2,)", &i8s), Ok((vec![2], vec![5.0, -1.0]))),
            (npy("<c8", "(1,)", &[0; 8]), Err("is not taken")),
            (b"rows,of,csv".to_vec(), Err("neither .npy nor .npz")),
        ];
        for (bytes, want) in cases {
            match (read_sample(&bytes, "input"), want) {
                (Ok(s), Ok((shape, values))) => assert_eq!((s.shape, s.values), (shape, values)),
                (Err(e), Err(part)) => assert!(e.contains(part), "{e}"),
                (got, want) => panic!("{got:?} vs {want:?}"),
            }
        }
    }
}
