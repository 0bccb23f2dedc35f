//! docs/configuration.md against the edge's config types: every key edge-node has is documented there,
//! and every key documented for it is one edge-node accepts.

#[test]
fn the_configuration_reference_matches_edge_toml() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md"))
        .expect("docs/configuration.md");
    let problems = fabric_node::config::reference_mismatches::<edge_node::EdgeConfig>(
        &page,
        &["Keys both roles share", "edge.toml only (edge-node)"],
    );
    assert!(problems.is_empty(), "docs/configuration.md and edge.toml disagree:\n{}", problems.join("\n"));
}
