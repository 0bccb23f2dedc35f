//! `fabric`: the operator CLI. Creates development certificates, and drives the model registry over
//! QUIC with an operator certificate: model versions, deployments, rollouts, nodes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use fabric_proto::registry::{NodeQuery, ProtoError, RegistryAddr, RegistryClient, Request, RolloutAction, Target};
use fabric_proto::tls::{generate_dev_pki_with_names, NodeCert, TlsFiles};
use serde_json::Value;

/// Operator CLI of the inference fabric.
///
/// Registry commands connect to --registry (FABRIC_REGISTRY) with the operator certificate --id
/// (FABRIC_ID) from --certs (FABRIC_CERTS). Every command prints a table, or JSON with --output json.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// The registry, as [NAME@]HOST:PORT (NAME: the name in its certificate)
    #[arg(long, global = true, env = "FABRIC_REGISTRY", default_value = "registry-1@127.0.0.1:7000")]
    registry: String,
    /// Folder with ca.pem and the operator's <id>.pem / <id>.key.pem
    #[arg(long, global = true, env = "FABRIC_CERTS", default_value = "certs")]
    certs: PathBuf,
    /// The operator's certificate name in --certs
    #[arg(long, global = true, env = "FABRIC_ID", default_value = "operator")]
    id: String,
    /// Output format
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a development CA (once) and a certificate per node, as PEM files in a folder.
    ///
    /// Example: fabric certs --out certs --node registry-1:registry --node hub-1:hub --node edge-1:edge --node operator:operator
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
    /// Model versions: push, list, show, remove.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Serve a model on a group of nodes (pins its newest version if it has no rollout yet).
    Deploy {
        /// Model name
        name: String,
        /// Which nodes
        #[arg(long, value_enum)]
        to: Target,
        /// Labels the nodes must carry, as k=v,k2=v2
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: BTreeMap<String, String>,
        /// Replicas per node
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Rollouts: status, pin, canary, shadow, promote, rollback.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Nodes: id, role, labels, last heartbeat, versions ready, load; those that need attention (down,
    /// a version failing) first.
    ///
    /// Example: fabric nodes --state down --label site=berlin --limit 20
    Nodes {
        /// Only nodes with these labels, as k=v,k2=v2
        #[arg(long = "label", value_parser = parse_labels, default_value = "")]
        labels: BTreeMap<String, String>,
        /// Only nodes up, or down
        #[arg(long, value_parser = ["up", "down"])]
        state: Option<String>,
        /// Only edges, or hubs
        #[arg(long, value_parser = ["edge", "hub"])]
        role: Option<String>,
        /// At most this many (0: all)
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The fabric live, in the terminal: nodes, models, rollouts with their traffic split, per-version
    /// latency and errors, autoscaling decisions (the registry's status page, refreshed every second).
    Top {
        /// Print once and exit (for scripts)
        #[arg(long)]
        once: bool,
        /// Milliseconds between refreshes
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Upload an ONNX file as a new, immutable version (shows progress; the registry checks it parses).
    Push {
        /// Model name
        name: String,
        /// The ONNX file
        file: PathBuf,
        /// Version number [default: the newest + 1]
        #[arg(long)]
        version: Option<u64>,
    },
    /// Every model version.
    List,
    /// A model (its versions, deployments, rollout), or one version: NAME or NAME:VERSION.
    Show { name: String },
    /// Delete a version (refused while a rollout or a node uses it): NAME:VERSION.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// The rollout: nodes per state, per version ready and per route, the canary analysis, and each
    /// node's routing and readiness for the nodes that need attention first.
    Status {
        name: String,
        /// Nodes shown one by one (0: all); the rest are counted
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Every request to one version.
    Pin { name: String, version: u64 },
    /// A share of requests to a canary version.
    Canary {
        name: String,
        version: u64,
        /// Percent of requests (0-100)
        #[arg(long)]
        weight: u32,
        /// Roll back by itself when the canary's errors or p99 latency are worse than the stable version's
        #[arg(long)]
        auto_rollback: bool,
    },
    /// A copy of a share of requests to a version (answers compared, never returned); --share 0 ends it.
    Shadow {
        name: String,
        version: u64,
        /// Percent of requests copied
        #[arg(long)]
        share: u32,
    },
    /// The canary becomes the stable version.
    Promote { name: String },
    /// The canary goes back to 0% and is dropped; without a canary, back to the stable version
    /// before the last promote or pin.
    Rollback { name: String },
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

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("label '{p}' is not k=v"))
        })
        .collect()
}

fn split_version(s: &str) -> Result<(String, Option<u64>), String> {
    match s.split_once(':') {
        None => Ok((s.to_string(), None)),
        Some((n, v)) => {
            Ok((n.to_string(), Some(v.parse().map_err(|_| format!("'{v}' in '{s}' is not a version number"))?)))
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Certs { out, nodes } = &cli.command {
        for path in generate_dev_pki_with_names(out, nodes)? {
            println!("wrote {}", path.display());
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(registry_command(cli))
}

async fn registry_command(cli: Cli) -> anyhow::Result<()> {
    let target = RegistryAddr::parse(&cli.registry).map_err(anyhow::Error::msg)?;
    let files = TlsFiles::in_dir(&cli.certs, &cli.id);
    let client = RegistryClient::new(target, &files).map_err(|e| {
        anyhow::anyhow!(
            "{e} (an operator certificate: `fabric certs --out {} --node {}:operator`)",
            cli.certs.display(),
            cli.id
        )
    })?;
    let call = |request: Request| {
        let client = client.clone();
        async move { client.call(&request).await.map_err(explain) }
    };
    let (answer, show): (Value, fn(&Value)) = match cli.command {
        Command::Certs { .. } => return Ok(()),
        Command::Model(ModelCommand::Push { name, file, version }) => {
            let mut shown = 0u64;
            let interactive = cli.output == Output::Table;
            let answer = client
                .push(&name, version, &file, |sent, total| {
                    let pct = if total == 0 { 100 } else { sent * 100 / total };
                    if interactive && (pct >= shown + 10 || sent == total) {
                        shown = pct;
                        eprint!("\rpushing {}: {pct:>3}% of {:.1} MiB", file.display(), total as f64 / 1048576.0);
                        let _ = std::io::stderr().flush();
                    }
                })
                .await;
            if interactive {
                eprintln!();
            }
            (answer.map_err(explain)?, show_version)
        }
        Command::Model(ModelCommand::List) => (call(Request::ListModels).await?, show_versions),
        Command::Model(ModelCommand::Show { name }) => {
            let (name, version) = split_version(&name).map_err(anyhow::Error::msg)?;
            let shown: fn(&Value) = if version.is_some() { show_version } else { show_model };
            (call(Request::ShowModel { name, version }).await?, shown)
        }
        Command::Model(ModelCommand::Rm { name }) => {
            let (name, version) = split_version(&name).map_err(anyhow::Error::msg)?;
            let version =
                version.ok_or_else(|| anyhow::anyhow!("say which version: fabric model rm {name}:VERSION"))?;
            (call(Request::RemoveModel { name, version }).await?, show_json)
        }
        Command::Deploy { name, to, labels, replicas } => {
            (call(Request::Deploy { name, to, labels, replicas }).await?, show_rollout_change)
        }
        Command::Rollout(command) => {
            let (name, change) = match command {
                RolloutCommand::Status { name, limit } => {
                    let answer = call(Request::RolloutStatus { name, limit: Some(limit) }).await?;
                    return print(&answer, cli.output, show_status);
                }
                RolloutCommand::Pin { name, version } => (name, RolloutAction::Pin { version }),
                RolloutCommand::Canary { name, version, weight, auto_rollback } => {
                    (name, RolloutAction::Canary { version, weight, auto_rollback })
                }
                RolloutCommand::Shadow { name, version, share } => (name, RolloutAction::Shadow { version, share }),
                RolloutCommand::Promote { name } => (name, RolloutAction::Promote),
                RolloutCommand::Rollback { name } => (name, RolloutAction::Rollback),
            };
            (call(Request::Rollout { name, change }).await?, show_rollout_change)
        }
        Command::Nodes { labels, state, role, limit } => {
            let query = NodeQuery { labels, state, role, limit: Some(limit) };
            let answer = call(Request::Nodes(query)).await?;
            if cli.output == Output::Table && limit > 0 && answer.as_array().is_some_and(|a| a.len() == limit) {
                show_nodes(&answer);
                println!("(the first {limit}: --limit 0 for all)");
                return Ok(());
            }
            (answer, show_nodes)
        }
        Command::Top { once, interval_ms } => loop {
            let overview = call(Request::Overview).await?;
            if once || cli.output == Output::Json {
                return print(&overview, cli.output, show_top);
            }
            // Clear the screen and draw from the top left.
            print!("\x1b[2J\x1b[H");
            show_top(&overview);
            let _ = std::io::stdout().flush();
            tokio::time::sleep(std::time::Duration::from_millis(interval_ms.max(100))).await;
        },
    };
    print(&answer, cli.output, show)
}

/// `fabric top`: the nodes, then each model's rollout, traffic split, per-version figures and
/// autoscaling decisions.
fn show_top(v: &Value) {
    println!("fabric top: registry generation {}", text(&v["generation"]));
    println!();
    let counts: Vec<String> = v["node_counts"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(role, c)| {
            format!("{role}s: {} up, {} down", c["up"].as_u64().unwrap_or(0), c["down"].as_u64().unwrap_or(0))
        })
        .collect();
    println!("{} nodes ({})", text(&v["nodes_total"]), counts.join("; "));
    show_nodes(&v["nodes"]);
    for m in v["models"].as_array().into_iter().flatten() {
        println!();
        let versions: Vec<String> =
            m["versions"].as_array().into_iter().flatten().map(|v| format!("v{}", text(&v["version"]))).collect();
        let status = &m["status"];
        if status.is_null() {
            println!("{} ({}): not deployed", text(&m["name"]), versions.join(" "));
            continue;
        }
        let r = &status["rollout"];
        let canary = if r["canary"].is_null() {
            "none".to_string()
        } else {
            format!("v{} at {}%", text(&r["canary"]["version"]), text(&r["canary"]["weight"]))
        };
        println!("{} ({}): stable v{}  canary {canary}", text(&m["name"]), versions.join(" "), text(&r["stable"]));
        if let Some(why) = r["auto_rolled_back"].as_str() {
            println!("  automatically rolled back: {why}");
        }
        // Per version, summed over the nodes' last reports by the registry; versions that serve.
        println!("  {:<8} {:>8} {:>10} {:>8} {:>9}", "VERSION", "SPLIT", "REQUESTS/S", "ERRORS", "P99 MS");
        for v in m["live"].as_array().into_iter().flatten() {
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            if f("replicas") == 0.0 && f("requests_per_s") == 0.0 && f("weight_pct") == 0.0 {
                continue;
            }
            let (version, weight, rate, errors, p99) =
                (text(&v["version"]), f("weight_pct"), f("requests_per_s"), f("error_pct"), f("p99_ms"));
            println!("  {:<8} {weight:>7.0}% {rate:>10.1} {errors:>7.1}% {p99:>9.2}", format!("v{version}"));
        }
        for n in status["nodes"].as_array().into_iter().flatten() {
            for (key, d) in n["autoscaled"].as_object().into_iter().flatten() {
                println!(
                    "  autoscaled {} {key}: {} replicas ({})",
                    text(&n["node"]),
                    text(&d["replicas"]),
                    text(&d["reason"])
                );
            }
        }
    }
}

/// Turns a protocol error into advice.
fn explain(e: ProtoError) -> anyhow::Error {
    match e {
        ProtoError::Io(m) => {
            anyhow::anyhow!("{m} (is model-registry running there? check --registry / FABRIC_REGISTRY)")
        }
        other => anyhow::anyhow!("{other}"),
    }
}

fn print(answer: &Value, output: Output, table: fn(&Value)) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Output::Table => table(answer),
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn show_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn show_version(v: &Value) {
    println!(
        "{}:{}  digest sha256:{}  {} bytes  pushed by {}",
        text(&v["name"]),
        text(&v["version"]),
        text(&v["digest"]),
        text(&v["size"]),
        text(&v["pushed_by"])
    );
    for (kind, specs) in [("input", &v["inputs"]), ("output", &v["outputs"])] {
        for s in specs.as_array().into_iter().flatten() {
            println!("  {kind} {} {} {}", text(&s["name"]), text(&s["datatype"]), s["shape"]);
        }
    }
}

fn show_versions(v: &Value) {
    println!("{:<20} {:>7} {:<14} {:>12} {}", "MODEL", "VERSION", "DIGEST", "BYTES", "PUSHED BY");
    for m in v.as_array().into_iter().flatten() {
        let digest = text(&m["digest"]);
        println!(
            "{:<20} {:>7} {:<14} {:>12} {}",
            text(&m["name"]),
            text(&m["version"]),
            &digest[..digest.len().min(12)],
            text(&m["size"]),
            text(&m["pushed_by"])
        );
    }
}

fn show_model(v: &Value) {
    show_versions(&v["versions"]);
    println!("deployments: {}", v["deployments"]);
    show_rollout(&v["rollout"]);
}

fn show_rollout(r: &Value) {
    let canary = match &r["canary"] {
        Value::Null => "none".to_string(),
        c => format!(
            "version {} at {}%{}",
            text(&c["version"]),
            text(&c["weight"]),
            if c["auto_rollback"] == true { " (auto-rollback)" } else { "" }
        ),
    };
    let shadow = match &r["shadow"] {
        Value::Null => "none".to_string(),
        s => format!("version {} with {}%", text(&s["version"]), text(&s["share"])),
    };
    println!("stable: {}  canary: {canary}  shadow: {shadow}", text(&r["stable"]));
    if let Some(why) = r["auto_rolled_back"].as_str() {
        println!("automatically rolled back: {why}");
    }
}

fn show_rollout_change(v: &Value) {
    println!("{}: generation {}", text(&v["name"]), text(&v["generation"]));
    show_rollout(&v["rollout"]);
}

fn show_status(v: &Value) {
    println!("{} (generation {})", text(&v["name"]), text(&v["generation"]));
    show_rollout(&v["rollout"]);
    if let Some(a) = v["analysis"].as_object() {
        for side in ["stable", "canary"] {
            let w = &a[side];
            println!(
                "  {side:<6} requests {} errors {:.1}% p99 {} ms",
                text(&w["requests"]),
                w["error_pct"].as_f64().unwrap_or(0.0),
                text(&w["p99_ms"])
            );
        }
    }
    let s = &v["summary"];
    println!(
        "nodes: {} ({} up, {} down; {} converged, {} converging)",
        text(&s["nodes"]),
        text(&s["up"]),
        text(&s["down"]),
        text(&s["converged"]),
        text(&s["not_converged"])
    );
    let ready: Vec<String> =
        s["ready"].as_object().into_iter().flatten().map(|(v, n)| format!("v{v} on {}", text(n))).collect();
    println!("ready: {}", if ready.is_empty() { "-".to_string() } else { ready.join(", ") });
    for r in s["routes"].as_array().into_iter().flatten() {
        println!("route {} on {} nodes", r["weights"], text(&r["nodes"]));
    }
    println!("{:<12} {:<5} {:<10} {:<10} {:<20} {:<16}", "NODE", "STATE", "READY", "CONVERGED", "WEIGHTS", "REPLICAS");
    for n in v["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<5} {:<10} {:<10} {:<20} {:<16}",
            text(&n["node"]),
            text(&n["state"]),
            n["ready"].to_string(),
            text(&n["converged"]),
            n["policy"]["weights"].to_string(),
            n["replicas"].to_string()
        );
        for (version, s) in n["autoscaled"].as_object().into_iter().flatten() {
            println!("  autoscaled {version} to {}: {}", text(&s["replicas"]), text(&s["reason"]));
        }
    }
    let shown = v["nodes"].as_array().map_or(0, Vec::len);
    if s["nodes"].as_u64().is_some_and(|n| n as usize > shown) {
        println!("(nodes that need attention first: {shown} of {}; --limit 0 for all)", text(&s["nodes"]));
    }
    println!("history:");
    for e in v["rollout"]["history"].as_array().into_iter().flatten() {
        println!("  generation {:>4}: {}", text(&e["generation"]), text(&e["what"]));
    }
}

fn show_nodes(v: &Value) {
    println!(
        "{:<12} {:<5} {:<5} {:<20} {:>9} {:>10} {:>8} {}",
        "NODE", "STATE", "ROLE", "LABELS", "HEARTBEAT", "SERVED/S", "RESTARTS", "READY"
    );
    for n in v.as_array().into_iter().flatten() {
        let labels: Vec<String> =
            n["labels"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", text(v))).collect();
        println!(
            "{:<12} {:<5} {:<5} {:<20} {:>7}ms {:>10.0} {:>8} {}",
            text(&n["node"]),
            text(&n["state"]),
            text(&n["role"]),
            labels.join(","),
            text(&n["last_heartbeat_ms"]),
            n["served_per_s"].as_f64().unwrap_or(0.0),
            n["restarts"].as_f64().unwrap_or(0.0),
            n["ready"].as_array().map(|r| r.iter().map(text).collect::<Vec<_>>().join(" ")).unwrap_or_default()
        );
        for f in n["failing"].as_array().into_iter().flatten() {
            println!(
                "{:<12} FAILING {}:{} ({} restarts): {}",
                "",
                text(&f["model"]),
                text(&f["version"]),
                text(&f["restarts"]),
                text(&f["reason"])
            );
        }
    }
}
