//! The `cloud-hub` binary: parse the config, start the hub.

use std::path::PathBuf;

use clap::Parser;
use cloud_hub::HubConfig;
use fabric_node::boot::{self, ServingArgs};

/// Cloud inference hub: serves ONNX models with ONNX Runtime (TensorRT > CUDA > CPU) over the
/// KServe v2 HTTP API and over QUIC (mutual TLS) for edge-nodes offloading their overflow.
///
/// Every setting has a default (HTTP on 127.0.0.1:8100, QUIC on 127.0.0.1:4433, engine ort); a config
/// file (TOML) overrides them, and flags override the file. `cloud-hub --print-config` shows every key
/// with its default value.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, env = "CLOUD_HUB_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    serving: ServingArgs,
    /// QUIC listen address [default: 127.0.0.1:4433]
    #[arg(long)]
    quic_addr: Option<String>,
    /// Folder with ca.pem, <node-id>.pem and <node-id>.key.pem (as `fabric certs` writes them)
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This hub's node id, naming its certificate in --certs [default: hub-1]
    #[arg(long, default_value = "hub-1")]
    node_id: String,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    boot::init_logging();
    let mut config: HubConfig = match &cli.config {
        Some(path) => fabric_node::config::load_role_config(path)?,
        None => HubConfig::default(),
    };
    cli.serving.apply(&mut config.serving);
    if let Some(addr) = cli.quic_addr {
        config.quic.addr = addr;
    }
    if let Some(dir) = cli.certs {
        config.quic.tls = Some(fabric_proto::tls::TlsFiles::in_dir(&dir, &cli.node_id));
    }
    if cli.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    let scheme = if config.serving.tls.cert.is_some() { "https" } else { "http" };
    actix_web::rt::System::new().block_on(cloud_hub::run(config, |addrs| {
        println!("cloud-hub listening on {scheme}://{} quic://{}", addrs.http, addrs.quic);
    }))
}
