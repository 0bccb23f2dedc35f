//! Element types of tensors, named as the Open Inference Protocol (KServe v2) names them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The element type of a tensor, in KServe v2 spelling (`FP32`, `INT64`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    /// Boolean, one byte per element (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE half precision; recognised but not served (refused with a clear error).
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
    /// Variable-length byte strings; recognised but not served (refused with a clear error).
    Bytes,
}

/// Every data type, in a fixed order (for tables, tests and error messages).
pub const ALL_DATA_TYPES: [DataType; 13] = [
    DataType::Bool,
    DataType::Uint8,
    DataType::Uint16,
    DataType::Uint32,
    DataType::Uint64,
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::Fp16,
    DataType::Fp32,
    DataType::Fp64,
    DataType::Bytes,
];

impl DataType {
    /// The KServe v2 name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element, or `None` for variable-length `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Whether the engines of this fabric can take and return this type.
    pub fn is_served(self) -> bool {
        !matches!(self, DataType::Fp16 | DataType::Bytes)
    }

    /// The type for an ONNX `TensorProto.DataType` code, `None` for codes the fabric does not know.
    pub fn from_onnx(code: i32) -> Option<DataType> {
        Some(match code {
            1 => DataType::Fp32,
            2 => DataType::Uint8,
            3 => DataType::Int8,
            4 => DataType::Uint16,
            5 => DataType::Int16,
            6 => DataType::Int32,
            7 => DataType::Int64,
            8 => DataType::Bytes,
            9 => DataType::Bool,
            10 => DataType::Fp16,
            11 => DataType::Fp64,
            12 => DataType::Uint32,
            13 => DataType::Uint64,
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A data type name that is not one of KServe v2's.
#[derive(Debug, thiserror::Error)]
#[error("unknown datatype '{0}' (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES)")]
pub struct UnknownDataType(pub String);

impl FromStr for DataType {
    type Err = UnknownDataType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_DATA_TYPES.iter().copied().find(|d| d.as_str() == s).ok_or_else(|| UnknownDataType(s.to_string()))
    }
}

/// A Rust scalar type that maps one-to-one onto a fixed-size [`DataType`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The data type of this scalar.
    const DTYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DataType = DataType::$d; })* };
}
element!(u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64, i8 => Int8, i16 => Int16,
         i32 => Int32, i64 => Int64, f32 => Fp32, f64 => Fp64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in ALL_DATA_TYPES {
            assert_eq!(d.as_str().parse::<DataType>().ok(), Some(d));
            assert_eq!(serde_json::to_string(&d).ok(), Some(format!("\"{}\"", d.as_str())));
        }
        let err = "FLOAT".parse::<DataType>().map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("unknown datatype 'FLOAT'"));
    }

    #[test]
    fn sizes_and_onnx_codes() {
        let table = [
            (1, DataType::Fp32, Some(4)),
            (7, DataType::Int64, Some(8)),
            (9, DataType::Bool, Some(1)),
            (11, DataType::Fp64, Some(8)),
            (10, DataType::Fp16, Some(2)),
            (8, DataType::Bytes, None),
        ];
        for (code, dtype, size) in table {
            assert_eq!(DataType::from_onnx(code), Some(dtype));
            assert_eq!(dtype.size(), size);
        }
        assert_eq!(DataType::from_onnx(16), None); // bfloat16
        assert!(!DataType::Fp16.is_served() && !DataType::Bytes.is_served() && DataType::Bool.is_served());
    }
}
