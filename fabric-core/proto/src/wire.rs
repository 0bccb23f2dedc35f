//! The QUIC wire format between edge-nodes and hubs: one bidirectional stream per request.
//!
//! A message is a sequence of frames, each a big-endian `u32` length and that many bytes. The first
//! frame is a header (serde, postcard encoding) that starts with the protocol version; one frame per
//! tensor follows, raw little-endian bytes. Every length is checked against [`WireLimits`] before
//! anything is allocated, so a malformed or hostile peer costs at most one bounded frame.
//!
//! The encoding and checks here are pure; [`read_frame`] works on any async reader, so tests feed it
//! bytes directly and the hub and edge feed it QUIC streams.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use fabric_types::dtype::DataType;
use fabric_types::tensor::{NamedTensor, Tensor};

/// The protocol version this build speaks (2: responses say how the request arrived, [`Arrival`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// QUIC application error codes used to reset streams and close connections.
pub mod codes {
    /// The peer sent bytes that are not a valid message.
    pub const MALFORMED: u32 = 1;
    /// A frame exceeded the configured limit.
    pub const TOO_LARGE: u32 = 2;
    /// The peer took too long.
    pub const TIMEOUT: u32 = 3;
    /// The peer is not allowed to use this service.
    pub const FORBIDDEN: u32 = 4;
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 5;
}

/// Size limits for frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireLimits {
    /// Largest header frame.
    pub max_header_bytes: usize,
    /// Largest tensor frame.
    pub max_tensor_bytes: usize,
    /// Largest whole message (header and every tensor together).
    pub max_message_bytes: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits { max_header_bytes: 64 << 10, max_tensor_bytes: 64 << 20, max_message_bytes: 64 << 20 }
    }
}

/// Declaration of one tensor in a header; its bytes follow in their own frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHeader {
    /// Input or output name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape.
    pub shape: Vec<u64>,
}

/// The header of an infer request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// Always [`PROTOCOL_VERSION`] first, so a peer can refuse versions it does not speak.
    pub protocol: u16,
    /// Id of the request, echoed in the response.
    pub request_id: u64,
    /// Trace id, for logs on both sides.
    pub trace_id: u64,
    /// Model name.
    pub model: String,
    /// Version, or `None` for whatever the hub routes to.
    pub version: Option<u64>,
    /// Microseconds left until the deadline when the request was sent (clocks are not shared).
    pub budget_us: u64,
    /// The inputs, whose bytes follow in this order.
    pub inputs: Vec<TensorHeader>,
}

/// How a hub failed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is invalid for the model (shape, dtype, names).
    BadRequest,
    /// No such model or version on this hub.
    UnknownModel,
    /// The hub is overloaded (queue full, or the deadline cannot be met): try elsewhere.
    Busy,
    /// The deadline passed.
    DeadlineExceeded,
    /// The message was malformed or too large.
    Malformed,
    /// The hub failed running it.
    Internal,
    /// The protocol version is not spoken here.
    UnsupportedProtocol,
}

/// A hub's load, reported with every response so edges can pick the least loaded hub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubLoad {
    /// Requests being served or queued on the hub.
    pub in_flight: u32,
    /// Requests the hub will take before it starts refusing.
    pub capacity: u32,
}

/// How often a hub sends its load to each connected edge (a QUIC datagram), so an edge that has
/// stopped sending (because the hub said busy) learns when it has room again.
pub const LOAD_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The unsolicited load report a hub sends as a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LoadReport {
    protocol: u16,
    load: HubLoad,
}

/// Encodes a load report datagram.
pub fn encode_load_report(load: HubLoad) -> Result<Vec<u8>, WireError> {
    postcard::to_allocvec(&LoadReport { protocol: PROTOCOL_VERSION, load })
        .map_err(|e| WireError::Malformed(e.to_string()))
}

/// Decodes a load report datagram, refusing other protocol versions.
pub fn decode_load_report(datagram: &[u8]) -> Result<HubLoad, WireError> {
    decode_header::<LoadReport>(datagram).map(|r| r.load)
}

/// The header of a response: outputs (whose bytes follow) or an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    /// Always [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The request's id.
    pub request_id: u64,
    /// Outputs, or why there are none.
    pub result: Result<Vec<TensorHeader>, (ErrorCode, String)>,
    /// The hub's load after this request.
    pub load: HubLoad,
    /// How the request's bytes arrived and how long the hub took after (`None`: not measured).
    pub arrival: Option<Arrival>,
}

/// What the hub saw of one request's arrival: the edge learns its uplink from the receiving end,
/// where the bottleneck's pace shows (acknowledgements seen at the sender come late, and QUIC may
/// delay them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// Bytes the connection received while the request's bytes were arriving (its own and any other
    /// stream's: the link's delivery over that time).
    pub bytes: u64,
    /// From the request's first bytes to its last, in microseconds.
    pub micros: u64,
    /// From its last bytes to the answer being written: the hub's queue and compute, in microseconds.
    pub hub_micros: u64,
}

/// What can go wrong reading or writing messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame exceeded its limit.
    #[error("{what} frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, len: usize, limit: usize },
    /// The stream ended inside a frame, or before a required frame.
    #[error("stream ended early: {0}")]
    Truncated(String),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The transport failed.
    #[error("transport: {0}")]
    Io(String),
}

impl WireError {
    /// The stream reset code matching this error.
    pub fn code(&self) -> u32 {
        match self {
            WireError::TooLarge { .. } => codes::TOO_LARGE,
            _ => codes::MALFORMED,
        }
    }
}

/// Appends one length-prefixed frame; a payload over 4 GiB cannot be framed.
pub fn put_frame(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLarge {
        what: "frame",
        len: payload.len(),
        limit: u32::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Encodes a header and the tensors that follow it as one message.
pub fn encode_message<H: Serialize>(header: &H, tensors: &[&Tensor]) -> Result<Vec<u8>, WireError> {
    let head = postcard::to_allocvec(header).map_err(|e| WireError::Malformed(e.to_string()))?;
    let mut out = Vec::with_capacity(4 + head.len() + tensors.iter().map(|t| 4 + t.bytes().len()).sum::<usize>());
    put_frame(&mut out, &head)?;
    for t in tensors {
        put_frame(&mut out, t.bytes())?;
    }
    Ok(out)
}

/// Reads one frame of at most `limit` bytes; `Ok(None)` at a clean end of stream before the frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
    what: &'static str,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match reader.read(&mut len[got..]).await.map_err(|e| WireError::Io(e.to_string()))? {
            0 if got == 0 => return Ok(None),
            0 => return Err(WireError::Truncated(format!("inside the length of a {what} frame"))),
            n => got += n,
        }
    }
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > limit {
        return Err(WireError::TooLarge { what, len, limit });
    }
    // Grow the buffer as bytes arrive (doubling from 64 KiB), not from the length prefix alone: a peer
    // that announces 64 MiB and sends nothing costs nothing.
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        let step = (len - buf.len()).min(buf.len().max(64 << 10));
        let start = buf.len();
        buf.resize(start + step, 0);
        reader
            .read_exact(&mut buf[start..])
            .await
            .map_err(|e| WireError::Truncated(format!("{what} frame of {len} bytes: {e}")))?;
    }
    Ok(Some(buf))
}

/// Decodes a header frame, refusing other protocol versions first.
pub fn decode_header<H: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<H, WireError> {
    // The version is the first field of every header: postcard writes a u16 as a varint.
    let (version, _) =
        postcard::take_from_bytes::<u16>(frame).map_err(|e| WireError::Malformed(format!("header: {e}")))?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    postcard::from_bytes(frame).map_err(|e| WireError::Malformed(format!("header: {e}")))
}

/// Reads a header frame and the tensor frames it declares.
pub async fn read_message<R, H>(
    reader: &mut R,
    limits: &WireLimits,
    tensors_of: impl Fn(&H) -> &[TensorHeader],
) -> Result<(H, Vec<NamedTensor>), WireError>
where
    R: AsyncRead + Unpin,
    H: for<'de> Deserialize<'de>,
{
    let (header, header_len) = read_header(reader, limits).await?;
    let tensors = read_tensors(reader, limits, header_len, tensors_of(&header)).await?;
    Ok((header, tensors))
}

/// Reads and decodes a header frame; returns it with its size (which counts toward the message limit).
pub async fn read_header<R, H>(reader: &mut R, limits: &WireLimits) -> Result<(H, usize), WireError>
where
    R: AsyncRead + Unpin,
    H: for<'de> Deserialize<'de>,
{
    let frame = read_frame(reader, limits.max_header_bytes, "header")
        .await?
        .ok_or_else(|| WireError::Truncated("no header".into()))?;
    Ok((decode_header(&frame)?, frame.len()))
}

/// Reads the tensor frames a header declares. The declared sizes are checked against the message limit
/// before any is read, and each frame against its declaration, so a hostile peer costs at most what
/// it declared within the limits.
pub async fn read_tensors<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &WireLimits,
    header_len: usize,
    decls: &[TensorHeader],
) -> Result<Vec<NamedTensor>, WireError> {
    let mut shapes = Vec::with_capacity(decls.len());
    let mut total = header_len;
    for decl in decls {
        let shape =
            decl.shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<usize>, _>>().map_err(|_| {
                WireError::Malformed(format!("tensor '{}': a dimension does not fit this machine", decl.name))
            })?;
        let bytes = shape
            .iter()
            .try_fold(decl.datatype.size().unwrap_or(1), |a, &d| a.checked_mul(d))
            .ok_or_else(|| WireError::Malformed(format!("tensor '{}': its shape overflows", decl.name)))?;
        total = total.saturating_add(bytes);
        if total > limits.max_message_bytes {
            return Err(WireError::TooLarge { what: "message", len: total, limit: limits.max_message_bytes });
        }
        shapes.push((shape, bytes));
    }
    let mut tensors = Vec::with_capacity(decls.len());
    for (decl, (shape, declared)) in decls.iter().zip(shapes) {
        let bytes = read_frame(reader, limits.max_tensor_bytes.min(declared), "tensor")
            .await?
            .ok_or_else(|| WireError::Truncated(format!("no data for tensor '{}'", decl.name)))?;
        let tensor = Tensor::from_bytes(decl.datatype, shape, bytes)
            .map_err(|e| WireError::Malformed(format!("tensor '{}': {e}", decl.name)))?;
        tensors.push(NamedTensor::new(decl.name.clone(), tensor));
    }
    Ok(tensors)
}

/// The header entries for named tensors.
pub fn tensor_headers(tensors: &[NamedTensor]) -> Vec<TensorHeader> {
    tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            datatype: t.tensor.dtype(),
            shape: t.tensor.shape().iter().map(|&d| u64::try_from(d).unwrap_or(u64::MAX)).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> (RequestHeader, Vec<NamedTensor>) {
        let t = NamedTensor::new("input", Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).expect("tensor"));
        let header = RequestHeader {
            protocol: PROTOCOL_VERSION,
            request_id: 9,
            trace_id: 77,
            model: "mlp".into(),
            version: None,
            budget_us: 5_000,
            inputs: tensor_headers(std::slice::from_ref(&t)),
        };
        (header, vec![t])
    }

    async fn read(bytes: &[u8], limits: WireLimits) -> Result<(RequestHeader, Vec<NamedTensor>), WireError> {
        let mut reader = bytes;
        read_message(&mut reader, &limits, |h: &RequestHeader| &h.inputs).await
    }

    #[tokio::test]
    async fn round_trip_and_every_malformation() {
        let (header, tensors) = request();
        let bytes = encode_message(&header, &[&tensors[0].tensor]).expect("encode");
        let (got, got_tensors) = read(&bytes, WireLimits::default()).await.expect("decode");
        assert_eq!((got, got_tensors), (header.clone(), tensors.clone()));

        let mut other_version = header.clone();
        other_version.protocol = 9;
        let v9 = encode_message(&other_version, &[&tensors[0].tensor]).expect("encode");
        let mut wrong_size = header.clone();
        wrong_size.inputs[0].shape = vec![3, 2];
        let mismatch = encode_message(&wrong_size, &[&tensors[0].tensor]).expect("encode");
        let mut garbage = Vec::new();
        put_frame(&mut garbage, &[PROTOCOL_VERSION as u8, 0xff, 0xff, 0xff, 0xff, 0xff]).expect("frame");
        let tight = WireLimits { max_header_bytes: 8, ..WireLimits::default() };
        // Two tensors of 16 bytes each, each under the frame limit, together over a 40-byte message.
        let mut two = header.clone();
        two.inputs.push(TensorHeader { name: "second".into(), ..two.inputs[0].clone() });
        let two_bytes = encode_message(&two, &[&tensors[0].tensor, &tensors[0].tensor]).expect("encode");
        let small_message = WireLimits { max_message_bytes: 40, ..WireLimits::default() };
        // A header declaring 4 bytes more than the frame that follows carries.
        let mut longer_frame = bytes.clone();
        let at = longer_frame.len() - 16 - 4;
        longer_frame[at..at + 4].copy_from_slice(&20u32.to_be_bytes());
        longer_frame.extend_from_slice(&[0; 4]);
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, WireLimits, &str)> = vec![
            ("empty stream", vec![], WireLimits::default(), "stream ended early: no header"),
            ("cut inside length", bytes[..2].to_vec(), WireLimits::default(), "inside the length of a header frame"),
            ("cut inside header", bytes[..10].to_vec(), WireLimits::default(), "header frame of"),
            ("cut inside tensor", bytes[..bytes.len() - 10].to_vec(), WireLimits::default(), "tensor frame of 16 bytes"),
            ("no tensor frame", bytes[..4 + u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize].to_vec(), WireLimits::default(), "no data for tensor 'input'"),
            ("oversized header", bytes.clone(), tight, "header frame of"),
            ("oversized length prefix", vec![0xff, 0xff, 0xff, 0xff], WireLimits::default(), "exceeds the limit of 65536 bytes"),
            ("other version", v9, WireLimits::default(), "peer speaks protocol version 9"),
            ("garbage header", garbage, WireLimits::default(), "malformed message: header"),
            ("size mismatch", mismatch, WireLimits::default(), "tensor 'input'"),
            ("whole message over its limit", two_bytes, small_message, "message frame of"),
            ("frame longer than its declaration", longer_frame, WireLimits::default(), "tensor frame of 20 bytes exceeds the limit of 16 bytes"),
        ];
        for (label, bytes, limits, want) in cases {
            let err = read(&bytes, limits).await.map(|_| ()).expect_err(label).to_string();
            assert!(err.contains(want), "{label}: {err}");
        }
    }
}
