//! Running a batch at bucket sizes: the rows padded with zeros up to the smallest bucket that holds
//! them (split at the largest), the padding's outputs dropped, so that a GPU session only ever sees
//! a few batch shapes (see `fabric_policy::gpu` for why). Host-side only; the engine's own `run`
//! is passed in, so this is tested without a GPU.

use fabric_policy::gpu::plan;
use fabric_types::tensor::Tensor;

use crate::EngineError;

/// Rows `from .. from + rows` of `t`, then zero rows up to `bucket`.
fn rows_padded(t: &Tensor, from: usize, rows: usize, bucket: usize) -> Result<Tensor, EngineError> {
    let batch = t.batch_size();
    let row_bytes = t.bytes().len().checked_div(batch).unwrap_or(0);
    let mut data = Vec::with_capacity(bucket * row_bytes);
    data.extend_from_slice(&t.bytes()[from * row_bytes..(from + rows) * row_bytes]);
    data.resize(bucket * row_bytes, 0);
    let mut shape = t.shape().to_vec();
    if let Some(first) = shape.first_mut() {
        *first = bucket;
    }
    Ok(Tensor::from_bytes(t.dtype(), shape, data)?)
}

/// Runs `inputs` (graph order, one batch) through `run` at the sizes in `buckets` (ascending) and
/// returns the outputs of the real rows only, as one batch. Runs the batch as it is where bucketing
/// cannot apply: no buckets, inputs of different batch sizes, or an output whose leading dimension is
/// not the batch (its rows cannot be told apart from the padding's).
pub fn run_in_buckets(
    inputs: &[&Tensor],
    buckets: &[usize],
    mut run: impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, EngineError>,
) -> Result<Vec<Tensor>, EngineError> {
    let rows = inputs.first().map(|t| t.batch_size()).unwrap_or(0);
    let runs = plan(rows, buckets);
    let exact = matches!(runs.as_slice(), [only] if only.bucket == rows);
    if exact || runs.is_empty() || inputs.iter().any(|t| t.shape().is_empty() || t.batch_size() != rows) {
        return run(inputs);
    }
    let mut per_run: Vec<Vec<Tensor>> = Vec::with_capacity(runs.len());
    let mut from = 0;
    for r in &runs {
        let fed = inputs.iter().map(|t| rows_padded(t, from, r.rows, r.bucket)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Tensor> = fed.iter().collect();
        let outputs = run(&refs)?;
        if outputs.iter().any(|o| o.shape().is_empty() || o.batch_size() != r.bucket) {
            return run(inputs);
        }
        let real = outputs
            .into_iter()
            .map(|o| {
                if r.bucket == r.rows {
                    return Ok(o);
                }
                let mut pieces = o.split_batch(&[r.rows, r.bucket - r.rows])?;
                Ok(pieces.swap_remove(0))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        per_run.push(real);
        from += r.rows;
    }
    if per_run.len() == 1 {
        return Ok(per_run.swap_remove(0));
    }
    let outputs = per_run.first().map_or(0, Vec::len);
    (0..outputs)
        .map(|i| {
            let parts: Vec<&Tensor> = per_run.iter().filter_map(|outs| outs.get(i)).collect();
            Ok(Tensor::concat_batch(&parts)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a session: each row's output is its input row summed, with the batch shapes it
    /// was given recorded (what a GPU session would have to build for).
    fn row_sums(seen: &mut Vec<usize>) -> impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, EngineError> + '_ {
        move |inputs| {
            let x = inputs[0];
            seen.push(x.batch_size());
            let values = x.as_slice::<f32>()?;
            let width = x.shape()[1];
            let sums: Vec<f32> = values.chunks(width).map(|row| row.iter().sum()).collect();
            Ok(vec![Tensor::from_vec(vec![x.batch_size(), 1], sums)?])
        }
    }

    #[test]
    fn the_session_sees_only_bucket_sizes_and_the_answer_is_the_unpadded_one() {
        let buckets = [1, 2, 4, 8];
        let cases: [(usize, &[usize]); 6] =
            [(1, &[1]), (3, &[4]), (4, &[4]), (5, &[8]), (11, &[8, 4]), (17, &[8, 8, 1])];
        for (rows, want_shapes) in cases {
            let values: Vec<f32> = (0..rows * 3).map(|v| v as f32 + 1.0).collect();
            let x = Tensor::from_vec(vec![rows, 3], values.clone()).unwrap();
            let mut seen = Vec::new();
            let out = run_in_buckets(&[&x], &buckets, row_sums(&mut seen)).unwrap();
            assert_eq!(seen, want_shapes, "{rows} rows");
            let want: Vec<f32> = values.chunks(3).map(|r| r.iter().sum()).collect();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].shape(), &[rows, 1]);
            assert_eq!(out[0].as_slice::<f32>().unwrap().to_vec(), want, "{rows} rows");
        }
    }

    #[test]
    fn an_output_without_the_batch_axis_runs_the_batch_as_it_is() {
        let x = Tensor::from_vec(vec![3, 2], vec![1.0f32; 6]).unwrap();
        let mut seen = Vec::new();
        let out = run_in_buckets(&[&x], &[1, 2, 4], |inputs| {
            seen.push(inputs[0].batch_size());
            // Always one row out, whatever came in: which rows are padding cannot be told.
            Ok(vec![Tensor::from_vec(vec![1], vec![inputs[0].batch_size() as f32]).unwrap()])
        })
        .unwrap();
        assert_eq!(seen, [4, 3], "tried at the bucket, then as it is");
        assert_eq!(out[0].as_slice::<f32>().unwrap().to_vec(), vec![3.0]);
        let mut seen = Vec::new();
        let none = run_in_buckets(&[&x], &[], row_sums(&mut seen)).unwrap();
        assert_eq!((seen.as_slice(), none[0].shape()), (&[3][..], &[3, 1][..]), "no buckets: as it is");
    }
}
