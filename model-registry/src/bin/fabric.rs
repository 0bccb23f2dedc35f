//! `fabric`: the operator CLI. For now it creates development certificates; registry commands
//! (push, rollout, status) arrive with the registry.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fabric_core::tls::{generate_dev_pki, Role};

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
    /// Example: fabric certs --out certs --node hub-1:hub --node edge-1:edge --node alice:operator
    /// The CA in the folder is reused on later runs, so nodes can be added. For production, point
    /// each node's config at certificates from your own CA instead (CN = node id, OU = role).
    Certs {
        /// Folder to write ca.pem, ca.key.pem, <id>.pem and <id>.key.pem into.
        #[arg(long)]
        out: PathBuf,
        /// A node as <id>:<role>, role one of edge, hub, registry, operator. Repeatable.
        #[arg(long = "node", value_parser = parse_node)]
        nodes: Vec<(String, Role)>,
    },
}

fn parse_node(s: &str) -> Result<(String, Role), String> {
    let (id, role) = s.split_once(':').ok_or_else(|| format!("'{s}' is not <id>:<role>"))?;
    if id.is_empty() {
        return Err("node id is empty".into());
    }
    Ok((id.to_string(), role.parse()?))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Certs { out, nodes } => {
            for path in generate_dev_pki(&out, &nodes)? {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
