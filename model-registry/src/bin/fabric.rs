//! `fabric`: the operator CLI. For now it creates development certificates; registry commands
//! (push, rollout, status) arrive with the registry.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fabric_core::tls::{generate_dev_pki_with_names, NodeCert};

/// Operator CLI of the inference fabric.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a development CA (once) and a certificate per node, as PEM files in a folder.
    ///
    /// Example: fabric certs --out certs --node hub-1:hub:hub1.example.net --node edge-1:edge --node alice:operator
    /// Each certificate names its node id and the names listed after the role (DNS names or IP
    /// addresses), nothing else: an edge checks that the hub it reached carries the name it asked for
    /// (`--hub hub-1@10.0.0.5:4433`, or the DNS name of `--hub hub1.example.net:4433`). Private keys
    /// are written 0600. The CA in the folder is reused on later runs, so nodes can be added. For
    /// production, point each node's config at certificates from your own CA instead (CN = node id,
    /// OU = role, the names peers use as subject alternative names).
    Certs {
        /// Folder to write ca.pem, ca.key.pem, <id>.pem and <id>.key.pem into.
        #[arg(long)]
        out: PathBuf,
        /// A node as <id>:<role>[:<name>,...], role one of edge, hub, registry, operator; names are
        /// extra DNS names or IP addresses for its certificate. Repeatable.
        #[arg(long = "node", value_parser = parse_node)]
        nodes: Vec<NodeCert>,
    },
}

fn parse_node(s: &str) -> Result<NodeCert, String> {
    let (id, rest) = s.split_once(':').ok_or_else(|| format!("'{s}' is not <id>:<role>[:<name>,...]"))?;
    if id.is_empty() {
        return Err("node id is empty".into());
    }
    let (role, names) = rest.split_once(':').unwrap_or((rest, ""));
    let names: Vec<String> = names.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
    Ok(NodeCert { id: id.to_string(), role: role.parse()?, names })
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Certs { out, nodes } => {
            for path in generate_dev_pki_with_names(&out, &nodes)? {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
