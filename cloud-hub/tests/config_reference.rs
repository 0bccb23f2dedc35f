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

#[test]
fn the_documented_production_config_loads_with_tls_on_its_public_ports() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/config/hub.toml"));
    let config: cloud_hub::HubConfig = fabric_node::config::load_role_config(path).expect("ops/config/hub.toml loads");
    assert!(config.serving.tls.files().expect("tls").is_some(), "TLS on the HTTP and gRPC ports");
    assert!(config.serving.grpc.enabled && config.serving.clients.keys.len() == 2);
    fabric_node::clients::Clients::new(&config.serving.clients).expect("its client keys are usable");
    assert!(config.quic.tls.is_some(), "mutual TLS on the QUIC service");
}
