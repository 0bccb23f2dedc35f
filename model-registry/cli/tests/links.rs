//! The `fabric` CLI is a small client: it talks to the registry and makes certificates. Built in
//! the same workspace build as the serving binaries (features unify across a build), it must
//! still link neither engine nor the HTTP server: those live in crates the CLI does not depend on.

/// Mangled-symbol prefixes of the crates the CLI must not link.
const FORBIDDEN: [(&str, &str); 5] = [
    ("_ZN10tract_core", "tract"),
    ("_ZN10tract_onnx", "tract-onnx"),
    ("_ZN3ort", "ONNX Runtime (ort)"),
    ("OrtGetApiBase", "ONNX Runtime (ort)"),
    ("_ZN9actix_web", "actix-web"),
];

#[test]
fn the_cli_links_no_engine_and_no_http_server() {
    let path = env!("CARGO_BIN_EXE_fabric");
    let binary = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // A crate the CLI does link, so that a binary without symbols cannot pass by accident.
    assert!(contains(&binary, b"_ZN12fabric_proto"), "{path} has no fabric_proto symbols: is it stripped?");
    let linked: Vec<&str> =
        FORBIDDEN.iter().filter(|(symbol, _)| contains(&binary, symbol.as_bytes())).map(|(_, name)| *name).collect();
    assert!(linked.is_empty(), "{path} links {linked:?}: the CLI must depend only on fabric-types, -policy and -proto");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
