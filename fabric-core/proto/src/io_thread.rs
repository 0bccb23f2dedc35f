//! A tokio runtime on a thread of its own, for the QUIC endpoints.
//!
//! quinn drives an endpoint and its connections (packets, encryption, acknowledgements) on the runtime
//! the endpoint was created on. The serving roles run their pool actors on actix's main thread; an
//! endpoint created there shares that thread with them, and under offload load the packet work then
//! delays every pool's batching (measured: the edge's main thread at 94% at 5x its capacity). Created
//! on its own thread, the QUIC work runs beside the pools instead of between their turns.

use std::io;

/// Starts a thread running a single-threaded tokio runtime for the life of the process, and returns a
/// handle to spawn on it and to `enter()` it (so that what is created there runs there).
pub fn spawn(name: &str) -> io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        // Runs what is spawned on it until the process exits.
        runtime.block_on(std::future::pending::<()>());
    })?;
    Ok(handle)
}
