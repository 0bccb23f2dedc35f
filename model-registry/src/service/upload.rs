//! Model files in and out: a pushed file is streamed to disk in blocks, hashed and checked as an
//! ONNX model before it becomes a version; a fetch streams a stored file by digest.

#[allow(unused_imports)]
use fabric_proto::answers::{FetchHead, TensorDecl};

use super::*;

impl Registry {
    pub(super) async fn push(
        &self,
        peer: &Identity,
        name: &str,
        version: Option<u64>,
        size: u64,
        recv: &mut quinn::RecvStream,
    ) -> Reply {
        check_name(name)?;
        if size > self.settings.max_model_bytes {
            let _ = recv.stop(0u32.into());
            return Err(Refusal::new(
                "too_large",
                format!(
                    "model file of {size} bytes is over the registry's limit of {} bytes (--max-model-mib)",
                    self.settings.max_model_bytes
                ),
            ));
        }
        let staged = self.store.staging_path();
        let result = self.receive(recv, &staged, size).await;
        let digest = match result {
            Ok(digest) => digest,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                let _ = recv.stop(0u32.into());
                return Err(e);
            }
        };
        // Validated before it is accepted: the file parses and its inputs and outputs are read.
        let path = staged.clone();
        let metadata = tokio::task::spawn_blocking(move || -> Result<fabric_engine::ModelMetadata, String> {
            let (_bytes, proto) = fabric_engine::model::read_onnx(&path).map_err(|e| e.to_string())?;
            fabric_engine::ModelMetadata::from_proto(&proto, &path).map_err(|e| e.to_string())
        })
        .await
        .map_err(internal)?;
        let metadata = match metadata {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(Refusal::new("invalid", format!("not a usable ONNX model: {e}")));
            }
        };
        let mut committed = false;
        let reply = self.transition(|state| {
            let versions = state.models.entry(name.to_string()).or_default();
            let version = match version {
                Some(v) if versions.contains_key(&v) => {
                    return Err(Refusal::new(
                        "conflict",
                        format!("{name}:{v} exists and versions are immutable: push a new version"),
                    ))
                }
                Some(0) => return Err(Refusal::new("invalid", "versions start at 1")),
                Some(v) => v,
                None => versions.keys().next_back().map_or(1, |v| v + 1),
            };
            self.store.commit_blob(&staged, &digest).map_err(internal)?;
            committed = true;
            let model = ModelVersion {
                name: name.to_string(),
                version,
                digest: digest.clone(),
                size,
                inputs: metadata.inputs.iter().map(declared).collect(),
                outputs: metadata.outputs.iter().map(declared).collect(),
                pushed_by: peer.node_id.clone(),
                pushed_at: now_ms() / 1000,
                reference: None,
            };
            versions.insert(version, model.clone());
            answer(&model)
        });
        if reply.is_err() {
            let _ = std::fs::remove_file(&staged);
            if committed && !self.state().models.values().flat_map(|v| v.values()).any(|m| m.digest == digest) {
                self.store.remove_blob(&digest);
            }
        }
        reply
    }

    /// Reads exactly `size` bytes into `staged`, hashing them; refuses short and long streams. Bytes
    /// are written in blocks of [`WRITE_BLOCK`] (one trip to the blocking pool each, not one per chunk).
    pub(super) async fn receive(
        &self,
        recv: &mut quinn::RecvStream,
        staged: &Path,
        size: u64,
    ) -> Result<String, Refusal> {
        let file = std::fs::File::create(staged).map_err(internal)?;
        let mut file = Some(file);
        let mut block: Vec<u8> = Vec::with_capacity(WRITE_BLOCK);
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut got = 0u64;
        while let Some(chunk) = next_chunk(recv).await? {
            got += chunk.bytes.len() as u64;
            if got > size {
                return Err(Refusal::new(
                    "invalid",
                    format!("the upload sent more than the {size} bytes it announced"),
                ));
            }
            context.update(&chunk.bytes);
            block.extend_from_slice(&chunk.bytes);
            if block.len() >= WRITE_BLOCK {
                file = Some(write_block(file, std::mem::take(&mut block), false).await?);
                block.reserve(WRITE_BLOCK);
            }
        }
        if got != size {
            return Err(Refusal::new("invalid", format!("the upload was truncated: {got} of {size} bytes arrived")));
        }
        write_block(file, block, true).await?;
        Ok(registry::hex(context.finish().as_ref()))
    }

    /// Streams a model file to a node (or operator) that asked for it by digest, from byte `offset`
    /// on (a download resumed after a cut); an offset past the file's end gets the whole file, the
    /// answer's head saying from where.
    pub async fn fetch(
        &self,
        peer: &Identity,
        digest: &str,
        offset: u64,
        send: &mut quinn::SendStream,
    ) -> Result<(), Refusal> {
        use tokio::io::AsyncSeekExt;
        let known = self.state().models.values().flat_map(|v| v.values()).find(|m| m.digest == digest).cloned();
        if known.is_none() {
            if let Some(bytes) = self.reference_bytes(digest) {
                // A version's reference statistics: small, served from memory.
                let size = bytes.len() as u64;
                let offset = if offset <= size { offset } else { 0 };
                registry::write_frame(send, &answer(&FetchHead { size, offset })).await.map_err(internal)?;
                send.write_all(&bytes[offset as usize..]).await.map_err(internal)?;
                return Ok(());
            }
        }
        let Some(model) = known else {
            return Err(Refusal::new("not_found", format!("no model file with digest {digest}")));
        };
        let offset = if offset <= model.size { offset } else { 0 };
        tracing::debug!(node = %peer.node_id, model = %model.name, version = model.version, offset, "model file fetched");
        let path = self.store.blob_path(digest);
        let mut file = tokio::fs::File::open(&path).await.map_err(internal)?;
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(internal)?;
        registry::write_frame(send, &answer(&FetchHead { size: model.size, offset })).await.map_err(internal)?;
        tokio::io::copy(&mut file, send).await.map_err(internal)?;
        Ok(())
    }
}

/// The next chunk of an upload (`None` at its end); one that stalls for 30 s or is cut is refused.
pub(super) async fn next_chunk(recv: &mut quinn::RecvStream) -> Result<Option<quinn::Chunk>, Refusal> {
    tokio::time::timeout(Duration::from_secs(30), recv.read_chunk(registry::CHUNK, true))
        .await
        .map_err(|_| Refusal::new("invalid", "the upload stalled for 30 s"))?
        .map_err(|e| Refusal::new("invalid", format!("the upload was cut: {e}")))
}

/// A tensor as the registry records it.
fn declared(spec: &fabric_engine::TensorSpec) -> TensorDecl {
    TensorDecl { name: spec.name.clone(), datatype: spec.datatype, shape: spec.shape.clone() }
}

/// Bytes an upload buffers before writing them out.
pub(super) const WRITE_BLOCK: usize = 4 << 20;

/// Writes a block on the blocking pool (and syncs the file when `last`); hands the file back.
pub(super) async fn write_block(
    file: Option<std::fs::File>,
    block: Vec<u8>,
    last: bool,
) -> Result<std::fs::File, Refusal> {
    use std::io::Write;
    let mut file = file.ok_or_else(|| internal("upload file lost"))?;
    tokio::task::spawn_blocking(move || {
        file.write_all(&block)?;
        if last {
            file.sync_all()?;
        }
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(internal)?
    .map_err(internal)
}
