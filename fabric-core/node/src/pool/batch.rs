//! Joining requests into one batch and splitting a batch's outputs back per request: pure functions
//! on tensors, so that "each request gets its own rows" is tested without an engine.

use fabric_types::tensor::{Tensor, TensorError};

/// Joins requests (each its inputs in graph order) into one input per position, along the leading
/// dimension; returns them with each request's rows (its first input's leading dimension).
pub fn join(requests: &[Vec<Tensor>]) -> Result<(Vec<Tensor>, Vec<usize>), TensorError> {
    let inputs = requests.first().map(Vec::len).unwrap_or(0);
    let joined = (0..inputs)
        .map(|i| Tensor::concat_batch(&requests.iter().map(|r| &r[i]).collect::<Vec<_>>()))
        .collect::<Result<Vec<_>, _>>()?;
    let rows = requests.iter().map(|r| r.first().map(Tensor::batch_size).unwrap_or(1)).collect();
    Ok((joined, rows))
}

/// Splits each output along the leading dimension by `rows`, into one set of outputs per request.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, TensorError> {
    let mut per_request: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); rows.len()];
    for output in outputs {
        for (slot, part) in per_request.iter_mut().zip(output.split_batch(rows)?) {
            slot.push(part);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize, start: f32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols).map(|i| start + i as f32).collect();
        Tensor::from_vec(vec![rows, cols], data).expect("tensor")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().expect("f32").into_owned()
    }

    #[test]
    fn join_then_split_gives_each_request_its_own_rows() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<usize>)> = vec![
            ("one request", vec![3]),
            ("equal sizes", vec![2, 2, 2]),
            ("mixed sizes", vec![1, 4, 2]),
        ];
        for (label, sizes) in cases {
            // Two inputs per request; request k's values start at 100 k, so rows are traceable.
            let requests: Vec<Vec<Tensor>> = sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| vec![t(n, 2, 100.0 * k as f32), t(n, 3, 100.0 * k as f32 + 50.0)])
                .collect();
            let (joined, rows) = join(&requests).expect("join");
            assert_eq!(rows, sizes, "{label}");
            assert_eq!(joined[0].shape(), &[sizes.iter().sum::<usize>(), 2], "{label}");
            // An identity "engine": the outputs are the joined inputs.
            let back = split(joined, &rows).expect("split");
            for (k, (got, want)) in back.iter().zip(&requests).enumerate() {
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(values(g), values(w), "{label}: request {k}");
                }
            }
        }
    }

    #[test]
    fn mismatched_rows_are_an_error_not_a_wrong_split() {
        let outputs = vec![t(3, 2, 0.0)];
        assert!(split(outputs, &[2, 2]).is_err(), "4 rows claimed, 3 present");
        let different_widths = vec![vec![t(1, 2, 0.0)], vec![t(1, 3, 0.0)]];
        assert!(join(&different_widths).is_err());
    }
}
