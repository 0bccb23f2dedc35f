//! `fabric`: the operator CLI. Creates development certificates, and drives the model registry over
//! QUIC with an operator certificate: model versions, deployments, rollouts, nodes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use fabric_proto::answers::{
    Deployed, ModelDetail, ModelVersion, NodeView, Overview, Removed, Rollout, RolloutChanged, RolloutStatus,
};
use fabric_proto::registry::{NodeQuery, ProtoError, RegistryAddr, RegistryClient, Request, RolloutAction, Target};
use fabric_proto::tls::{generate_dev_pki_with_names, NodeCert, TlsFiles};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Operator CLI of the inference fabric.
///
/// Registry commands connect to --registry (FABRIC_REGISTRY) with the operator certificate --id
/// (FABRIC_ID) from --certs (FABRIC_CERTS). Every command prints a table, or JSON with --output json.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// The registry, as [NAME@]HOST:PORT (NAME: the name in its certificate); a replicated registry:
    /// every replica, comma-separated (commands go to the leader, moving on when one fails)
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
        /// On edges, a cascade: requests this model answers less confidently than
        /// --cascade-threshold go to this (bigger) model on the hubs, within their deadline
        #[arg(long)]
        cascade_to: Option<String>,
        /// With --cascade-to: the confidence under which a request escalates (top1: the top class's
        /// probability; margin: its lead over the second)
        #[arg(long, default_value_t = 0.9)]
        cascade_threshold: f64,
        /// With --cascade-to: how confidence is read from the scores
        #[arg(long, value_parser = ["top1", "margin"], default_value = "top1")]
        cascade_measure: String,
        /// With --cascade-to: the output holding the scores [default: the first scores output [N, C]]
        #[arg(long)]
        cascade_output: Option<String>,
    },
    /// Rollouts: status, pin, canary, shadow, promote, rollback.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Drift of a model's inputs and predictions from each version's reference sample, over the
    /// nodes' counts of the last 5-10 minutes: per feature and for the predictions, PSI (< 0.1 none,
    /// 0.1-0.25 moderate, > 0.25 significant) and the Jensen-Shannon distance corrected for sample
    /// size, which flags drift at 0.1 (it measures how far apart the distributions are, so it does
    /// not flag every negligible shift once many rows came in, as a p-value does).
    ///
    /// Example: fabric drift digits --features 10
    Drift {
        /// Model name
        name: String,
        /// Features shown per version, the most drifted first (0: all)
        #[arg(long, default_value_t = 5)]
        features: usize,
    },
    /// Nodes: id, role, labels, last heartbeat, versions ready, load, GPUs (a node with a GPU also
    /// carries the label gpu=NAME, e.g. gpu=nvidia-h200); those that need attention (down, a version
    /// failing) first.
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
        /// A sample of the inputs the model was trained on (.npy, or .npz as numpy.savez writes;
        /// rows first), binned into the version's reference statistics for drift (`fabric drift`)
        #[arg(long)]
        reference: Option<PathBuf>,
        /// With --reference: the model input the sample is of [default: the first]
        #[arg(long)]
        reference_input: Option<String>,
        /// With --reference: the output the predicted class is read from [default: an integer label
        /// output, else the argmax of a scores output]
        #[arg(long)]
        prediction_output: Option<String>,
    },
    /// Give an existing version a reference sample for drift: NAME:VERSION FILE (.npy or .npz; see
    /// `push --reference`). Replaces its reference; nodes count against the new one from then on.
    Reference {
        name: String,
        file: PathBuf,
        /// The model input the sample is of [default: the first]
        #[arg(long)]
        input: Option<String>,
        /// The output the predicted class is read from [default: a label output, else scores]
        #[arg(long)]
        prediction_output: Option<String>,
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
        /// Roll back by itself when the canary's errors, p99 latency or live accuracy (from feedback)
        /// are worse than the stable version's
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
    /// Moves a version across the nodes in waves: each wave moves the next share of the nodes the
    /// model is deployed to (chosen by a hash of the node id, so the same nodes every time; with
    /// --labels only nodes carrying them), and the next wave starts when the wave's time has passed
    /// with the moved nodes doing as well as the others (errors and p99, the canary analysis's
    /// margins). When they do worse, every moved node goes back at once (automatic abort). A node
    /// offline meanwhile gets its wave's state when it returns. `rollout status` shows the progress.
    Waves {
        name: String,
        version: u64,
        /// Each wave's cumulative share of the nodes, rising, the last 100%
        #[arg(long, default_value = "1%,10%,50%,100%", value_parser = parse_steps)]
        steps: Steps,
        /// How long each wave runs, analysed, before the next: 90s, 5m, 1h, 500ms
        #[arg(long, default_value = "60s", value_parser = parse_duration_ms)]
        every: u64,
        /// Only nodes with these labels take part (k=v,...); the others stay on the stable version
        /// until the waves complete
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: BTreeMap<String, String>,
        /// Percent of a moved node's requests the new version takes (less than 100: a canary split
        /// on each moved node)
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Never abort by itself: moved nodes doing worse are only shown
        #[arg(long)]
        no_auto_abort: bool,
    },
    /// Holds a rollout in waves where it is (moved nodes stay moved).
    Pause { name: String },
    /// Lets a paused rollout in waves go on (the wave gets its whole time again).
    Resume { name: String },
    /// Stops a rollout in waves: every moved node goes back to the version it came from.
    Abort { name: String },
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

/// The waves' cumulative shares, percent (one argument: `1%,10%,50%,100%`).
#[derive(Clone, Debug)]
struct Steps(Vec<u32>);

fn parse_steps(s: &str) -> Result<Steps, String> {
    s.split(',')
        .map(|p| {
            p.trim().trim_end_matches('%').parse::<u32>().map_err(|_| format!("wave share '{p}' is not a percent"))
        })
        .collect::<Result<_, _>>()
        .map(Steps)
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = number.parse().map_err(|_| format!("'{s}' is not a duration like 90s, 5m, 500ms"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        other => return Err(format!("unknown unit '{other}' in '{s}': use ms, s, m or h")),
    };
    Ok(ms.round() as u64)
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
    let targets = RegistryAddr::parse_list(&cli.registry).map_err(anyhow::Error::msg)?;
    let files = TlsFiles::in_dir(&cli.certs, &cli.id);
    let client = RegistryClient::replicated(targets, &files).map_err(|e| {
        anyhow::anyhow!(
            "{e} (an operator certificate: `fabric certs --out {} --node {}:operator`)",
            cli.certs.display(),
            cli.id
        )
    })?;
    let output = cli.output;
    match cli.command {
        Command::Certs { .. } => Ok(()),
        Command::Model(ModelCommand::Push { name, file, version, reference, reference_input, prediction_output }) => {
            // The sample is read before the model goes up: a missing file fails before anything changes.
            let sample = match &reference {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("cannot read the reference sample {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let mut shown = 0u64;
            let interactive = output == Output::Table;
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
            let pushed: ModelVersion = typed(answer.map_err(explain)?)?;
            if output == Output::Table {
                show_version(&pushed);
            }
            if let Some(sample) = sample {
                let request = Request::Reference {
                    name: pushed.name.clone(),
                    version: pushed.version,
                    size: sample.len() as u64,
                    input: reference_input,
                    output: prediction_output,
                };
                let set = client.ask_with_bytes(&request, &sample).await.map_err(|e| {
                    anyhow::anyhow!(
                        "{name}:{version} was pushed, but its reference sample was refused: {e:#}; fix the sample and run `fabric model reference {name}:{version} FILE`",
                        e = explain(e),
                        name = pushed.name,
                        version = pushed.version
                    )
                })?;
                return print(&set, output, show_reference);
            }
            if output == Output::Json {
                return print(&pushed, output, show_version);
            }
            Ok(())
        }
        Command::Model(ModelCommand::Reference { name, file, input, prediction_output }) => {
            let (name, version) = split_version(&name).map_err(anyhow::Error::msg)?;
            let version = version
                .ok_or_else(|| anyhow::anyhow!("say which version: fabric model reference {name}:VERSION FILE"))?;
            let sample = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read the reference sample {}: {e}", file.display()))?;
            let request =
                Request::Reference { name, version, size: sample.len() as u64, input, output: prediction_output };
            let set = client.ask_with_bytes(&request, &sample).await.map_err(explain)?;
            print(&set, output, show_reference)
        }
        Command::Drift { name, features } => {
            let view: Value = ask(&client, Request::Drift { name }).await?;
            print(&view, output, |v| show_drift(v, features))
        }
        Command::Model(ModelCommand::List) => {
            print(&ask::<Vec<ModelVersion>>(&client, Request::ListModels).await?, output, |v| show_versions(v))
        }
        Command::Model(ModelCommand::Show { name }) => {
            let (name, version) = split_version(&name).map_err(anyhow::Error::msg)?;
            match version {
                Some(_) => print(
                    &ask::<ModelVersion>(&client, Request::ShowModel { name, version }).await?,
                    output,
                    show_version,
                ),
                None => {
                    print(&ask::<ModelDetail>(&client, Request::ShowModel { name, version }).await?, output, show_model)
                }
            }
        }
        Command::Model(ModelCommand::Rm { name }) => {
            let (name, version) = split_version(&name).map_err(anyhow::Error::msg)?;
            let version =
                version.ok_or_else(|| anyhow::anyhow!("say which version: fabric model rm {name}:VERSION"))?;
            let removed: Removed = ask(&client, Request::RemoveModel { name, version }).await?;
            print(&removed, output, |r| show_json(r))
        }
        Command::Deploy {
            name,
            to,
            labels,
            replicas,
            cascade_to,
            cascade_threshold,
            cascade_measure,
            cascade_output,
        } => {
            let cascade = cascade_to.map(|to| fabric_policy::cascade::Cascade {
                to,
                output: cascade_output,
                threshold: cascade_threshold,
                measure: if cascade_measure == "margin" {
                    fabric_policy::cascade::Measure::Margin
                } else {
                    fabric_policy::cascade::Measure::Top1
                },
            });
            let deployed: Deployed = ask(&client, Request::Deploy { name, to, labels, replicas, cascade }).await?;
            print(&deployed, output, |d| show_rollout_change(&d.name, d.generation, &d.rollout))
        }
        Command::Rollout(command) => {
            let (name, change) = match command {
                RolloutCommand::Status { name, limit } => {
                    let status: RolloutStatus =
                        ask(&client, Request::RolloutStatus { name, limit: Some(limit) }).await?;
                    return print(&status, output, show_status);
                }
                RolloutCommand::Pin { name, version } => (name, RolloutAction::Pin { version }),
                RolloutCommand::Canary { name, version, weight, auto_rollback } => {
                    (name, RolloutAction::Canary { version, weight, auto_rollback })
                }
                RolloutCommand::Shadow { name, version, share } => (name, RolloutAction::Shadow { version, share }),
                RolloutCommand::Waves { name, version, steps, every, labels, weight, no_auto_abort } => (
                    name,
                    RolloutAction::Waves {
                        version,
                        steps: steps.0,
                        every_ms: every,
                        labels,
                        weight,
                        auto_abort: !no_auto_abort,
                    },
                ),
                RolloutCommand::Pause { name } => (name, RolloutAction::Pause),
                RolloutCommand::Resume { name } => (name, RolloutAction::Resume),
                RolloutCommand::Abort { name } => (name, RolloutAction::Abort),
                RolloutCommand::Promote { name } => (name, RolloutAction::Promote),
                RolloutCommand::Rollback { name } => (name, RolloutAction::Rollback),
            };
            let changed: RolloutChanged = ask(&client, Request::Rollout { name, change }).await?;
            print(&changed, output, |c| show_rollout_change(&c.name, c.generation, &c.rollout))
        }
        Command::Nodes { labels, state, role, limit } => {
            let query = NodeQuery { labels, state, role, limit: Some(limit) };
            let nodes: Vec<NodeView> = ask(&client, Request::Nodes(query)).await?;
            if output == Output::Table && limit > 0 && nodes.len() == limit {
                show_nodes(&nodes);
                println!("(the first {limit}: --limit 0 for all)");
                return Ok(());
            }
            print(&nodes, output, |n| show_nodes(n))
        }
        Command::Top { once, interval_ms } => loop {
            let overview: Overview = ask(&client, Request::Overview).await?;
            if once || output == Output::Json {
                return print(&overview, output, show_top);
            }
            // Clear the screen and draw from the top left.
            print!("\x1b[2J\x1b[H");
            show_top(&overview);
            let _ = std::io::stdout().flush();
            tokio::time::sleep(std::time::Duration::from_millis(interval_ms.max(100))).await;
        },
    }
}

/// A reference set: its size and what it counts.
fn show_reference(v: &Value) {
    println!(
        "reference for {}:{}: {} rows of {} features from input '{}'; predictions from {}; digest {}",
        v["name"].as_str().unwrap_or("?"),
        v["version"],
        v["rows"],
        v["features"],
        v["input"].as_str().unwrap_or("?"),
        v["prediction_output"].as_str().map_or("no output (none is a class)".to_string(), |o| format!("'{o}'")),
        v["digest"].as_str().unwrap_or("?"),
    );
}

/// `fabric drift`: per version the verdict, the predictions' scores and the most drifted features.
fn show_drift(v: &Value, features: usize) {
    let name = v["name"].as_str().unwrap_or("?");
    let versions = v["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        println!("{name}: no version has a reference sample (fabric model reference {name}:VERSION FILE)");
        return;
    }
    let score = |s: &Value| -> String {
        match (s["psi"].as_f64(), s["js"].as_f64()) {
            (Some(psi), Some(js)) => format!(
                "PSI {psi:.3} ({}), JS {js:.3}{}",
                fabric_policy::drift::psi_band(psi),
                if s["drifted"].as_bool() == Some(true) { " DRIFT" } else { "" }
            ),
            _ => "-".into(),
        }
    };
    for version in &versions {
        println!(
            "{name}:{}: {} ({} live rows from {} node(s), reference {} rows, input '{}')",
            version["version"],
            version["verdict"].as_str().unwrap_or("?"),
            version["rows"],
            version["nodes"],
            version["reference_rows"],
            version["input"].as_str().unwrap_or("?"),
        );
        match version["prediction_output"].as_str() {
            Some(output) => println!("  predictions ('{output}'): {}", score(&version["prediction"])),
            None => println!("  predictions: not counted (no class output)"),
        }
        let all = version["features"].as_array().cloned().unwrap_or_default();
        println!("  features drifted: {} of {}", version["drifted_features"], all.len());
        let shown = if features == 0 { all.len() } else { features.min(all.len()) };
        for f in &all[..shown] {
            println!("  feature {:>4}: {}", f["feature"], score(f));
        }
    }
}

/// One request, its answer read as `T`.
async fn ask<T: DeserializeOwned>(client: &RegistryClient, request: Request) -> anyhow::Result<T> {
    client.ask(&request).await.map_err(explain)
}

/// An answer read as `T`.
fn typed<T: DeserializeOwned>(answer: Value) -> anyhow::Result<T> {
    serde_json::from_value(answer).map_err(|e| anyhow::anyhow!("the registry's answer is not what this CLI reads: {e}"))
}

/// `fabric top`: the nodes, then each model's rollout, traffic split, per-version figures and
/// autoscaling decisions.
fn show_top(v: &Overview) {
    println!("fabric top: registry generation {}", v.generation);
    println!();
    let counts: Vec<String> = v
        .node_counts
        .iter()
        .map(|(role, c)| {
            let n = |state: &str| c.get(state).copied().unwrap_or(0);
            format!("{role}s: {} up, {} down", n("up"), n("down"))
        })
        .collect();
    println!("{} nodes ({})", v.nodes_total, counts.join("; "));
    show_nodes(&v.nodes);
    for m in &v.models {
        println!();
        let versions: Vec<String> = m.versions.iter().map(|v| format!("v{}", v.version)).collect();
        let Some(status) = &m.status else {
            println!("{} ({}): not deployed", m.name, versions.join(" "));
            continue;
        };
        let r = &status.rollout;
        let canary = r.canary.map_or("none".to_string(), |c| format!("v{} at {}%", c.version, c.weight));
        println!("{} ({}): stable v{}  canary {canary}", m.name, versions.join(" "), opt(r.stable));
        if let Some(w) = &r.waves {
            println!("  {}", waves_line(w));
        }
        if let Some(w) = &status.waves {
            println!("  wave {} of {}: {} of {} nodes moved", w.wave, w.waves, w.moved, w.taking_part);
        }
        if let Some(why) = &r.auto_rolled_back {
            println!("  automatically rolled back: {why}");
        }
        // Per version, summed over the nodes' last reports by the registry; versions that serve.
        println!("  {:<8} {:>8} {:>10} {:>8} {:>9}", "VERSION", "SPLIT", "REQUESTS/S", "ERRORS", "P99 MS");
        for v in &m.live {
            if v.replicas == 0 && v.requests_per_s == 0.0 && v.weight_pct == 0.0 {
                continue;
            }
            let (weight, rate, errors, p99) = (v.weight_pct, v.requests_per_s, v.error_pct, v.p99_ms.unwrap_or(0.0));
            println!("  {:<8} {weight:>7.0}% {rate:>10.1} {errors:>7.1}% {p99:>9.2}", format!("v{}", v.version));
        }
        for n in &status.nodes {
            for (key, d) in &n.autoscaled {
                println!("  autoscaled {} {key}: {} replicas ({})", n.node, d.replicas, d.reason);
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

fn print<T: Serialize>(answer: &T, output: Output, table: impl Fn(&T)) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Output::Table => table(answer),
    }
    Ok(())
}

/// A value, or `-` for none.
fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// A value as JSON on one line (`null` for none).
fn json_text(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn show_json(v: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn show_version(v: &ModelVersion) {
    println!("{}:{}  digest sha256:{}  {} bytes  pushed by {}", v.name, v.version, v.digest, v.size, v.pushed_by);
    for (kind, specs) in [("input", &v.inputs), ("output", &v.outputs)] {
        for s in specs {
            println!("  {kind} {} {} {}", s.name, s.datatype, json_text(&s.shape));
        }
    }
    if let Some(r) = &v.reference {
        let predictions =
            r.stats.prediction.as_ref().map_or("none counted".to_string(), |p| format!("from '{}'", p.output));
        println!(
            "  reference for drift: {} rows of {} features from '{}', predictions {predictions} (fabric drift {})",
            r.stats.rows,
            r.stats.features(),
            r.stats.input,
            v.name
        );
    }
}

fn show_versions(versions: &[ModelVersion]) {
    println!("{:<20} {:>7} {:<14} {:>12} {}", "MODEL", "VERSION", "DIGEST", "BYTES", "PUSHED BY");
    for m in versions {
        println!(
            "{:<20} {:>7} {:<14} {:>12} {}",
            m.name,
            m.version,
            &m.digest[..m.digest.len().min(12)],
            m.size,
            m.pushed_by
        );
    }
}

fn show_model(m: &ModelDetail) {
    show_versions(&m.versions);
    println!("deployments: {}", json_text(&m.deployments));
    match &m.rollout {
        Some(r) => show_rollout(r),
        None => println!("stable: -  canary: none  shadow: none"),
    }
}

fn show_rollout(r: &Rollout) {
    let canary = r.canary.map_or("none".to_string(), |c| {
        format!("version {} at {}%{}", c.version, c.weight, if c.auto_rollback { " (auto-rollback)" } else { "" })
    });
    let shadow = r.shadow.map_or("none".to_string(), |s| format!("version {} with {}%", s.version, s.share));
    println!("stable: {}  canary: {canary}  shadow: {shadow}", opt(r.stable));
    if let Some(w) = &r.waves {
        println!("{}", waves_line(w));
    }
    if let Some(why) = &r.auto_rolled_back {
        println!("automatically rolled back: {why}");
    }
}

/// A rollout in waves in one line.
fn waves_line(w: &fabric_proto::answers::Waves) -> String {
    let steps: Vec<String> = w.steps.iter().map(|s| format!("{s}%")).collect();
    let phase = match w.phase {
        fabric_proto::answers::WavePhase::Running => "running",
        fabric_proto::answers::WavePhase::Paused => "paused",
        fabric_proto::answers::WavePhase::Completed => "completed",
        fabric_proto::answers::WavePhase::Aborted => "aborted",
    };
    let outcome = w.outcome.as_ref().map(|o| format!(" ({o})")).unwrap_or_default();
    format!(
        "waves: v{} -> v{} {phase} at wave {} of {} [{}], {} s each{}{outcome}",
        w.from,
        w.version,
        w.wave + 1,
        w.steps.len(),
        steps.join(" "),
        w.every_ms / 1000,
        if w.weight < 100 { format!(", {}% of each moved node's requests", w.weight) } else { String::new() }
    )
}

fn show_rollout_change(name: &str, generation: u64, rollout: &Rollout) {
    println!("{name}: generation {generation}");
    show_rollout(rollout);
}

fn show_status(v: &RolloutStatus) {
    println!("{} (generation {})", v.name, v.generation);
    show_rollout(&v.rollout);
    if let Some(w) = &v.waves {
        println!(
            "wave {} of {}: {} of {} nodes moved; next wave in {} s",
            w.wave,
            w.waves,
            w.moved,
            w.taking_part,
            w.next_in_ms.div_ceil(1000)
        );
    }
    if let Some(a) = &v.analysis {
        let sides = if v.waves.is_some() { ["others", "moved"] } else { ["stable", "canary"] };
        for (side, w) in [(sides[0], &a.stable), (sides[1], &a.canary)] {
            let accuracy = match w.accuracy_pct {
                Some(a) => format!(" accuracy {a:.1}% of {} labelled", w.labelled),
                None => String::new(),
            };
            println!(
                "  {side:<6} requests {} errors {:.1}% p99 {} ms{accuracy}",
                w.requests,
                w.error_pct,
                opt(w.p99_ms)
            );
        }
    }
    if !v.accuracy.is_empty() {
        let each: Vec<String> = v
            .accuracy
            .iter()
            .map(|(version, a)| format!("v{version} {:.1}% of {} labelled", a.accuracy_pct, a.labelled))
            .collect();
        println!("live accuracy (feedback): {}", each.join(", "));
    }
    let s = &v.summary;
    println!(
        "nodes: {} ({} up, {} down; {} converged, {} converging)",
        s.nodes, s.up, s.down, s.converged, s.not_converged
    );
    let ready: Vec<String> = s.ready.iter().map(|(v, n)| format!("v{v} on {n}")).collect();
    println!("ready: {}", if ready.is_empty() { "-".to_string() } else { ready.join(", ") });
    for r in &s.routes {
        println!("route {} on {} nodes", json_text(&r.weights), r.nodes);
    }
    println!("{:<12} {:<5} {:<10} {:<10} {:<20} {:<16}", "NODE", "STATE", "READY", "CONVERGED", "WEIGHTS", "REPLICAS");
    for n in &v.nodes {
        println!(
            "{:<12} {:<5} {:<10} {:<10} {:<20} {:<16}",
            n.node,
            n.state,
            json_text(&n.ready),
            n.converged,
            json_text(&n.policy.as_ref().map(|p| &p.weights)),
            json_text(&n.replicas)
        );
        for (version, s) in &n.autoscaled {
            println!("  autoscaled {version} to {}: {}", s.replicas, s.reason);
        }
    }
    if s.nodes > v.nodes.len() {
        println!("(nodes that need attention first: {} of {}; --limit 0 for all)", v.nodes.len(), s.nodes);
    }
    println!("history:");
    for e in &v.rollout.history {
        println!("  generation {:>4}: {}", e.generation, e.what);
    }
}

fn show_nodes(nodes: &[NodeView]) {
    println!(
        "{:<12} {:<5} {:<5} {:<20} {:>9} {:>10} {:>8} {}",
        "NODE", "STATE", "ROLE", "LABELS", "HEARTBEAT", "SERVED/S", "RESTARTS", "READY"
    );
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<12} {:<5} {:<5} {:<20} {:>7}ms {:>10.0} {:>8} {}",
            n.node,
            n.state,
            n.role,
            labels.join(","),
            n.last_heartbeat_ms,
            n.served_per_s,
            n.restarts,
            n.ready.join(" ")
        );
        if let Some(gpu) = &n.gpu {
            println!("{:<12} GPU {gpu}", "");
        }
        for f in &n.failing {
            println!(
                "{:<12} FAILING {}:{} ({} restarts): {}",
                "",
                f.model,
                f.version,
                f.restarts,
                opt(f.reason.as_ref())
            );
        }
    }
}
