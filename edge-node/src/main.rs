//! The `edge-node` binary: parse the config, start the server.

use std::path::PathBuf;

use clap::Parser;
use edge_node::offload::HubEndpoint;
use edge_node::EdgeConfig;
use fabric_node::boot::{self, ServingArgs};

/// Edge inference daemon: serves ONNX models from a model repository over the Open Inference
/// Protocol (KServe v2 REST, binary tensor extension included) on the local device.
///
/// Every setting has a default; a config file (TOML) overrides them, and flags override the file.
/// `edge-node --print-config` shows every key with its default value.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file (TOML). Without one, defaults apply.
    #[arg(long, short, env = "EDGE_NODE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    serving: ServingArgs,
    /// A hub to offload overflow to, as [NAME@]HOST:PORT of its QUIC service: HOST an IP literal
    /// ([IPv6] in brackets) or a DNS name; NAME the name its certificate must carry (its node id, or a
    /// DNS name or IP in it; default HOST). Repeatable. Example: --hub hub-1@10.0.0.5:4433
    #[arg(long = "hub")]
    hubs: Vec<String>,
    /// Folder with ca.pem, <node-id>.pem and <node-id>.key.pem (as `fabric certs` writes them)
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This node's id, naming its certificate in --certs [default: edge-1]
    #[arg(long, default_value = "edge-1")]
    node_id: String,
    /// Print the effective configuration (defaults, file and flags merged) as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    boot::init_logging();
    let mut config: EdgeConfig = match &cli.config {
        Some(path) => fabric_node::config::load_role_config(path)?,
        None => EdgeConfig::default(),
    };
    cli.serving.apply(&mut config.serving);
    for hub in cli.hubs {
        config.offload.hubs.push(HubEndpoint::parse(&hub)?);
    }
    if let Some(dir) = cli.certs {
        config.offload.tls = Some(fabric_proto::tls::TlsFiles::in_dir(&dir, &cli.node_id));
    }
    if cli.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    let scheme = if config.serving.tls.cert.is_some() { "https" } else { "http" };
    actix_web::rt::System::new().block_on(edge_node::run(config, |addr| {
        // A line on stdout that scripts and tests wait for.
        println!("edge-node listening on {scheme}://{addr}");
    }))
}
