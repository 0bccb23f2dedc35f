//! Tensors: a data type, a shape and the elements as little-endian bytes.
//!
//! Raw bytes are the one representation every edge of the fabric shares: the KServe v2 binary
//! extension, the QUIC wire format and both engines take them without reinterpretation, and a batch
//! is joined or split by slicing rows of bytes.

use std::borrow::Cow;

use crate::dtype::{DataType, Element};

/// Why bytes and a shape do not make a tensor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// The data type is recognised but not served (FP16, BYTES).
    #[error("datatype {0} is not supported by this fabric (supported: BOOL, UINT8..UINT64, INT8..INT64, FP32, FP64)")]
    UnsupportedDataType(DataType),
    /// The number of bytes does not match shape x element size.
    #[error("{dtype} tensor of shape {shape:?} needs {expected} bytes, got {got}")]
    ByteLength { dtype: DataType, shape: Vec<usize>, expected: usize, got: usize },
    /// The shape's element count overflows.
    #[error("tensor shape {shape:?} is too large")]
    TooLarge { shape: Vec<usize> },
    /// A BOOL element is neither 0 nor 1.
    #[error("BOOL tensor holds byte {value} at element {index}; only 0 and 1 are booleans")]
    InvalidBool { index: usize, value: u8 },
    /// Typed access with the wrong Rust type.
    #[error("tensor is {actual}, not {requested}")]
    WrongType { actual: DataType, requested: DataType },
    /// Tensors to join along the batch axis do not agree.
    #[error("cannot join tensors along the batch axis: {0}")]
    Join(String),
}

/// A dense tensor: data type, shape, and little-endian element bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DataType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A tensor with the name of the model input or output it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// The input or output name, as in the model.
    pub name: String,
    /// The tensor itself.
    pub tensor: Tensor,
}

impl NamedTensor {
    /// Pairs a name with a tensor.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        NamedTensor { name: name.into(), tensor }
    }
}

impl Tensor {
    /// Builds a tensor from raw little-endian bytes, checking length (and BOOL values).
    pub fn from_bytes(dtype: DataType, shape: Vec<usize>, data: Vec<u8>) -> Result<Tensor, TensorError> {
        let size = dtype.size().filter(|_| dtype.is_served()).ok_or(TensorError::UnsupportedDataType(dtype))?;
        let expected = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| TensorError::TooLarge { shape: shape.clone() })?;
        if data.len() != expected {
            return Err(TensorError::ByteLength { dtype, shape, expected, got: data.len() });
        }
        if dtype == DataType::Bool {
            if let Some((index, &value)) = data.iter().enumerate().find(|(_, b)| **b > 1) {
                return Err(TensorError::InvalidBool { index, value });
            }
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// Builds a tensor from typed elements.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Tensor, TensorError> {
        Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(&values).to_vec())
    }

    /// Builds a BOOL tensor.
    pub fn from_bools(shape: Vec<usize>, values: &[bool]) -> Result<Tensor, TensorError> {
        Tensor::from_bytes(DataType::Bool, shape, values.iter().map(|b| u8::from(*b)).collect())
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// The shape (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Takes the raw bytes out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// The elements as `T`, borrowed when the bytes happen to be aligned, copied otherwise.
    pub fn as_slice<T: Element>(&self) -> Result<Cow<'_, [T]>, TensorError> {
        let requested = T::DTYPE;
        // BOOL is stored as u8 and may be read as such.
        let compatible = self.dtype == requested || (self.dtype == DataType::Bool && requested == DataType::Uint8);
        if !compatible {
            return Err(TensorError::WrongType { actual: self.dtype, requested });
        }
        Ok(match bytemuck::try_cast_slice(&self.data) {
            Ok(slice) => Cow::Borrowed(slice),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(&self.data)),
        })
    }

    /// Size of the leading (batch) dimension; 1 for a scalar.
    pub fn batch_size(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Joins tensors of the same type and per-row shape along axis 0.
    pub fn concat_batch(parts: &[&Tensor]) -> Result<Tensor, TensorError> {
        let first = parts.first().ok_or_else(|| TensorError::Join("no tensors".into()))?;
        if first.shape.is_empty() {
            return Err(TensorError::Join("scalars have no batch axis".into()));
        }
        let mut rows = 0;
        let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
        for t in parts {
            if t.dtype != first.dtype || t.shape.get(1..) != first.shape.get(1..) {
                return Err(TensorError::Join(format!(
                    "{} {:?} does not match {} {:?}",
                    t.dtype, t.shape, first.dtype, first.shape
                )));
            }
            rows += t.shape[0];
            data.extend_from_slice(&t.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Ok(Tensor { dtype: first.dtype, shape, data })
    }

    /// Splits along axis 0 into consecutive pieces of the given row counts.
    pub fn split_batch(&self, rows: &[usize]) -> Result<Vec<Tensor>, TensorError> {
        let total: usize = rows.iter().sum();
        if self.shape.first() != Some(&total) {
            return Err(TensorError::Join(format!("cannot split {:?} into rows {rows:?}", self.shape)));
        }
        let row_bytes = if total == 0 { 0 } else { self.data.len() / total };
        let mut offset = 0;
        Ok(rows
            .iter()
            .map(|&n| {
                let mut shape = self.shape.clone();
                shape[0] = n;
                let data = self.data[offset..offset + n * row_bytes].to_vec();
                offset += n * row_bytes;
                Tensor { dtype: self.dtype, shape, data }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_checks_length_type_and_bools() {
        let cases: Vec<(DataType, Vec<usize>, Vec<u8>, Option<&str>)> = vec![
            (DataType::Fp32, vec![2, 2], vec![0; 16], None),
            (DataType::Fp32, vec![2, 2], vec![0; 15], Some("needs 16 bytes, got 15")),
            (DataType::Int64, vec![0, 3], vec![], None),
            (DataType::Bool, vec![3], vec![0, 1, 2], Some("byte 2 at element 2")),
            (DataType::Fp16, vec![1], vec![0; 2], Some("FP16 is not supported")),
            (DataType::Bytes, vec![1], vec![0; 2], Some("BYTES is not supported")),
            (DataType::Fp64, vec![usize::MAX, 2], vec![], Some("is too large")),
        ];
        for (dtype, shape, data, err) in cases {
            let got = Tensor::from_bytes(dtype, shape.clone(), data);
            match err {
                None => assert!(got.is_ok(), "{dtype} {shape:?}: {got:?}"),
                Some(msg) => {
                    let e = got.map(|_| ()).unwrap_err().to_string();
                    assert!(e.contains(msg), "{e}");
                }
            }
        }
    }

    #[test]
    fn typed_access_and_batching() -> Result<(), TensorError> {
        let a = Tensor::from_vec(vec![1, 3], vec![1.0f32, 2.0, 3.0])?;
        let b = Tensor::from_vec(vec![2, 3], vec![4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0])?;
        let joined = Tensor::concat_batch(&[&a, &b])?;
        assert_eq!(joined.shape(), &[3, 3]);
        assert_eq!(joined.as_slice::<f32>()?[3..6], [4.0, 5.0, 6.0]);
        let parts = joined.split_batch(&[1, 2])?;
        assert_eq!(parts, vec![a.clone(), b]);
        assert!(a.as_slice::<i64>().is_err());
        let other = Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0])?;
        assert!(Tensor::concat_batch(&[&a, &other]).is_err());
        assert!(joined.split_batch(&[1, 1]).is_err());
        let flags = Tensor::from_bools(vec![2], &[true, false])?;
        assert_eq!(&*flags.as_slice::<u8>()?, &[1, 0]);
        Ok(())
    }
}
