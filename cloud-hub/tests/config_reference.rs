//! docs/configuration.md against the hub's config types: every key cloud-hub has is documented there,
//! and every key documented for it is one cloud-hub accepts.

#[test]
fn the_configuration_reference_matches_hub_toml() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md"))
        .expect("docs/configuration.md");
    let problems = fabric_node::config::reference_mismatches::<cloud_hub::HubConfig>(
        &page,
        &["Keys both roles share", "hub.toml only (cloud-hub)"],
    );
    assert!(problems.is_empty(), "docs/configuration.md and hub.toml disagree:\n{}", problems.join("\n"));
}
