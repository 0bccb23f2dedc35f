//! Compiles the KServe v2 gRPC protocol (proto/*.proto, written here from the published definition)
//! with the Debian `protoc` (scripts/setup.sh installs it): nothing is downloaded at build time.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Tensor bytes as `Bytes`: raw contents are handed on without a copy.
        .bytes(".inference")
        .compile_protos(&["proto/grpc_service.proto"], &["proto"])?;
    Ok(())
}
