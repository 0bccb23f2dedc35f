//! The `cloud-hub` binary: parse the config, start the hub.

use std::path::PathBuf;

use clap::Parser;
use cloud_hub::HubConfig;

/// Cloud inference hub: serves ONNX models with ONNX Runtime (TensorRT > CUDA > CPU) over the
/// KServe v2 HTTP API and over QUIC (mutual TLS) for edge-nodes offloading their overflow.
///
/// Every setting has a default; a config file (TOML) overrides them, and flags override the file.
/// `cloud-hub --print-config` shows every key with its default value.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, env = "CLOUD_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8100]
    #[arg(long)]
    http_addr: Option<String>,
    /// QUIC listen address [default: 127.0.0.1:4433]
    #[arg(long)]
    quic_addr: Option<String>,
    /// Model repository folder: <repo>/<model>/<version>/model.onnx [default: models]
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Folder with ca.pem, <node-id>.pem and <node-id>.key.pem (as `fabric certs` writes them)
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This hub's node id, naming its certificate in --certs [default: hub-1]
    #[arg(long, default_value = "hub-1")]
    node_id: String,
    /// Refuse to start if any model fails to load (by default the others are served and the failure is
    /// reported by the model's /ready, the repository index and the server's /v2/health/ready).
    #[arg(long)]
    strict_models: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config: HubConfig = match &cli.config {
        Some(path) => fabric_core::config::load_toml(path)?,
        None => HubConfig::default(),
    };
    if let Some(addr) = cli.http_addr {
        config.http.addr = addr;
    }
    if let Some(addr) = cli.quic_addr {
        config.quic.addr = addr;
    }
    if let Some(repo) = cli.model_repository {
        config.models.path = repo;
    }
    config.models.strict |= cli.strict_models;
    if let Some(dir) = cli.certs {
        config.quic.tls = Some(fabric_core::tls::TlsFiles::in_dir(&dir, &cli.node_id));
    }
    if cli.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    actix_web::rt::System::new().block_on(cloud_hub::run(config, |addrs| {
        println!("cloud-hub listening on http://{} quic://{}", addrs.http, addrs.quic);
    }))
}
