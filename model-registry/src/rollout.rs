//! Rollout policy, pure: how a rollout changes ([`apply`]), what each node should serve and how it
//! should route ([`desired_for`]), and when a canary is worse enough to roll back ([`analyse`]).
//! Rollouts in waves ([`crate::waves`]) show each node the rollout it is in: a moved node runs the
//! waves' version as a canary beside the version it came from (at the waves' weight, 100% by
//! default), so an abort switches it back at once; the others run the stable version.
//!
//! A node's weights only ever name versions that node has ready: while the canary warms up on a node,
//! that node keeps the stable version at 100%, so traffic never exceeds ready capacity, and a
//! rollback or an abort puts the canary at 0% everywhere in the same generation.

use std::collections::{BTreeMap, BTreeSet};

use fabric_policy::traffic::{Shadow, TrafficPolicy};
use fabric_proto::registry::{DesiredModel, DesiredVersion, NodeInfo, Refusal, RolloutAction, Target};

use crate::state::{scaled_key, Canary, Deployment, RegistryState, Rollout, Scaled, ShadowRoute};
use crate::waves;
use fabric_proto::answers::WavePhase;

/// What a change may need to know beside the state: the time, and for a rollout in waves the
/// positions of the nodes that take part ([`waves::position`]).
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The positions of the nodes known now that the model is deployed to and that carry the waves'
    /// labels.
    pub positions: Vec<u64>,
}

/// Applies `change` to the rollout of `name`; returns the new rollout and a line for its history.
pub fn apply(
    state: &RegistryState,
    name: &str,
    change: &RolloutAction,
    context: &Context,
) -> Result<(Rollout, String), Refusal> {
    let versions = state.models.get(name).ok_or_else(|| {
        Refusal::new("not_found", format!("no model '{name}': push one with `fabric model push {name} FILE`"))
    })?;
    let exists = |v: u64| {
        if versions.contains_key(&v) {
            Ok(())
        } else {
            let known: Vec<String> = versions.keys().map(u64::to_string).collect();
            Err(Refusal::new(
                "not_found",
                format!("model '{name}' has no version {v} (versions: {})", known.join(", ")),
            ))
        }
    };
    let mut r = state.rollouts.get(name).cloned().unwrap_or_default();
    let waving = r.waves.as_ref().is_some_and(|w| w.active());
    match change {
        RolloutAction::Waves { .. }
        | RolloutAction::Canary { .. }
        | RolloutAction::Promote
        | RolloutAction::Pin { .. }
            if waving =>
        {
            return Err(Refusal::new(
                "conflict",
                format!(
                    "model '{name}' has a rollout in waves running: `fabric rollout abort {name}` (or let it complete) first"
                ),
            ));
        }
        RolloutAction::Pause | RolloutAction::Resume | RolloutAction::Abort if !waving => {
            return Err(Refusal::new("conflict", format!("model '{name}' has no rollout in waves running or paused")));
        }
        // A rollback during waves is their abort.
        RolloutAction::Rollback if waving => return apply(state, name, &RolloutAction::Abort, context),
        _ => {}
    }
    let line = match change.clone() {
        RolloutAction::Pin { version } => {
            exists(version)?;
            if r.stable != Some(version) {
                r.previous_stable = r.stable;
            }
            r.stable = Some(version);
            r.canary = None;
            if r.shadow.is_some_and(|s| s.version == version) {
                r.shadow = None;
            }
            format!("pinned version {version}")
        }
        RolloutAction::Canary { version, weight, auto_rollback } => {
            exists(version)?;
            if weight > 100 {
                return Err(Refusal::new("invalid", format!("canary weight must be 0-100, got {weight}")));
            }
            let stable = r.stable.ok_or_else(|| {
                Refusal::new(
                    "conflict",
                    format!("model '{name}' has no stable version: `fabric rollout pin {name} V` first"),
                )
            })?;
            if stable == version {
                return Err(Refusal::new("invalid", format!("version {version} is already the stable version")));
            }
            if r.shadow.is_some_and(|s| s.version == version) {
                r.shadow = None;
            }
            r.canary = Some(Canary { version, weight, auto_rollback });
            r.auto_rolled_back = None;
            let auto = if auto_rollback { " with automatic rollback" } else { "" };
            format!("canary version {version} at {weight}%{auto} (stable {stable})")
        }
        RolloutAction::Shadow { version, share } => {
            exists(version)?;
            if share > 100 {
                return Err(Refusal::new("invalid", format!("shadow share must be 0-100, got {share}")));
            }
            if share == 0 {
                r.shadow = None;
                format!("shadow of version {version} ended")
            } else {
                if r.stable == Some(version) || r.canary.is_some_and(|c| c.version == version) {
                    return Err(Refusal::new(
                        "invalid",
                        format!("version {version} already takes traffic; shadow another"),
                    ));
                }
                r.shadow = Some(ShadowRoute { version, share });
                format!("shadow version {version} with {share}% of requests")
            }
        }
        RolloutAction::Promote => {
            let canary = r
                .canary
                .take()
                .ok_or_else(|| Refusal::new("conflict", format!("model '{name}' has no canary to promote")))?;
            r.previous_stable = r.stable;
            r.stable = Some(canary.version);
            format!("promoted version {} to stable", canary.version)
        }
        // With a canary: its weight goes to 0 and it is dropped. Without one: back to the stable
        // version before the last promote or pin.
        RolloutAction::Rollback => match (r.canary.take(), r.previous_stable) {
            (Some(canary), _) => format!("rolled back canary version {} (weight 0)", canary.version),
            (None, Some(previous)) if versions.contains_key(&previous) => {
                let from = r.stable.replace(previous);
                r.previous_stable = from;
                format!("rolled back from version {} to version {previous}", from.map_or("-".into(), |v| v.to_string()))
            }
            _ => {
                return Err(Refusal::new(
                    "conflict",
                    format!("model '{name}' has no canary and no earlier stable version to roll back to"),
                ))
            }
        },
        RolloutAction::Waves { version, steps, every_ms, labels, weight, auto_abort } => {
            exists(version)?;
            let stable = r.stable.ok_or_else(|| {
                Refusal::new(
                    "conflict",
                    format!("model '{name}' has no stable version: `fabric rollout pin {name} V` first"),
                )
            })?;
            if r.canary.is_some() {
                return Err(Refusal::new(
                    "conflict",
                    format!("model '{name}' has a canary: promote or roll it back before a rollout in waves"),
                ));
            }
            let plan = waves::Plan { version, steps, every_ms, labels, weight, auto_abort };
            let w = waves::start(&plan, stable, context.positions.clone(), context.now_ms)?;
            let line = format!(
                "waves to version {version} from {stable}: {} every {} s{}; wave 1: {}%",
                w.steps.iter().map(|s| format!("{s}%")).collect::<Vec<_>>().join(","),
                w.every_ms / 1000,
                if auto_abort { " with automatic abort" } else { "" },
                w.steps[0]
            );
            r.waves = Some(w);
            r.auto_rolled_back = None;
            line
        }
        RolloutAction::Pause | RolloutAction::Resume | RolloutAction::Abort => {
            let w = r.waves.as_mut().ok_or_else(|| Refusal::new("conflict", "no rollout in waves"))?;
            match change {
                RolloutAction::Pause => {
                    w.phase = WavePhase::Paused;
                    format!("waves paused at wave {} of {}", w.wave + 1, w.steps.len())
                }
                RolloutAction::Resume => {
                    // The wave gets its whole time again, analysed, before the next one.
                    w.phase = WavePhase::Running;
                    w.wave_started_ms = context.now_ms;
                    w.wave_ready_ms = w.wave_ready_ms.map(|_| context.now_ms);
                    format!("waves resumed at wave {} of {}", w.wave + 1, w.steps.len())
                }
                _ => {
                    let step = waves::Step::Abort { why: format!("aborted by hand at wave {}", w.wave + 1) };
                    waves::apply_step(w, &step, context.now_ms).unwrap_or_default()
                }
            }
        }
    };
    Ok((r, line))
}

/// The rollout node `node` of model `name` is in: a node that a rollout in waves moved runs its
/// version as a canary beside the version it came from.
pub fn rollout_of<'a>(name: &str, rollout: &'a Rollout, node: &NodeInfo) -> std::borrow::Cow<'a, Rollout> {
    match rollout.waves.as_ref() {
        Some(w) if waves::moved(w, name, &node.node_id, &node.labels) => std::borrow::Cow::Owned(Rollout {
            stable: Some(w.from),
            canary: Some(Canary { version: w.version, weight: w.weight, auto_rollback: false }),
            ..rollout.clone()
        }),
        _ => std::borrow::Cow::Borrowed(rollout),
    }
}

/// Whether a deployment targets a node.
pub fn targets(deployment: &Deployment, node: &NodeInfo) -> bool {
    let role = match deployment.to {
        Target::All => true,
        Target::Edge => node.role == "edge",
        Target::Hub => node.role == "hub",
    };
    role && deployment.labels.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

/// What `node` should serve, given what it has `ready` now and the autoscaler's counts for it.
pub fn desired_for(
    state: &RegistryState,
    node: &NodeInfo,
    ready: &BTreeSet<(String, u64)>,
    scaled: Option<&BTreeMap<String, Scaled>>,
) -> Vec<DesiredModel> {
    let mut out = Vec::new();
    for (name, deployments) in &state.deployments {
        let replicas = deployments.iter().filter(|d| targets(d, node)).map(|d| d.replicas).max();
        // Edges only: a hub has no hub to escalate to.
        let cascade =
            deployments.iter().filter(|d| targets(d, node) && node.role == "edge").find_map(|d| d.cascade.clone());
        let (Some(replicas), Some(rollout)) = (replicas, state.rollouts.get(name)) else { continue };
        let Some(versions) = state.models.get(name) else { continue };
        let rollout = rollout_of(name, rollout, node);
        let is_ready = |v: u64| ready.contains(&(name.clone(), v));
        let policy = node_policy(&rollout, is_ready);
        let mut keep = rollout.versions();
        // Make before break: until a version of the rollout serves here, the versions ready here keep
        // serving (a rollback to a version this node had unloaded, a node that joins mid-rollout).
        if policy.is_none() {
            keep.extend(ready.iter().filter(|(m, _)| m == name).map(|(_, v)| *v));
            keep.sort_unstable();
            keep.dedup();
        }
        let wanted: Vec<DesiredVersion> = keep
            .into_iter()
            .filter_map(|v| versions.get(&v))
            .map(|m| {
                // The autoscaler's count once it has decided one, else the deployment's.
                let replicas =
                    scaled.and_then(|s| s.get(&scaled_key(name, m.version))).map_or(replicas, |s| s.replicas);
                DesiredVersion {
                    version: m.version,
                    digest: m.digest.clone(),
                    size: m.size,
                    replicas,
                    reference: m.reference.as_ref().map(|r| r.digest.clone()),
                }
            })
            .collect();
        out.push(DesiredModel { name: name.clone(), versions: wanted, policy, cascade });
    }
    out
}

/// The routing of one node: the rollout's weights over the versions ready there.
pub fn node_policy(rollout: &Rollout, ready: impl Fn(u64) -> bool) -> Option<TrafficPolicy> {
    let mut weights = BTreeMap::new();
    match (rollout.stable, rollout.canary) {
        (Some(stable), Some(c)) if ready(stable) && ready(c.version) => {
            if c.weight < 100 {
                weights.insert(stable, 100 - c.weight);
            }
            if c.weight > 0 {
                weights.insert(c.version, c.weight);
            }
        }
        (Some(stable), _) if ready(stable) => {
            weights.insert(stable, 100);
        }
        // The stable version is not ready here yet: a ready canary serves rather than nothing.
        (_, Some(c)) if ready(c.version) && c.weight > 0 => {
            weights.insert(c.version, 100);
        }
        _ => return None,
    }
    let shadow = rollout
        .shadow
        .filter(|s| ready(s.version) && !weights.contains_key(&s.version))
        .map(|s| Shadow { version: s.version, percent: s.share });
    Some(TrafficPolicy { weights, shadow })
}

/// What one version did over the nodes' report windows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    /// Requests answered (served, offloaded or refused).
    pub answered: f64,
    /// Of those, answered with an error.
    pub errors: f64,
    /// The 99th percentile over every node's answers (their histograms merged), in milliseconds.
    pub p99_ms: Option<f64>,
    /// Requests answered per second, summed over the nodes.
    pub per_s: f64,
    /// The median over every node's answers, in milliseconds.
    pub p50_ms: Option<f64>,
    /// Replicas ready, summed over the nodes.
    pub replicas: u64,
    /// Its share of versionless traffic, averaged over the nodes that serve it, in percent.
    pub weight_pct: f64,
    /// Rows labelled by feedback.
    pub labelled: u64,
    /// Of those, answered right.
    pub correct: u64,
}

impl Window {
    /// Live accuracy in percent, `None` before the first label.
    pub fn accuracy_pct(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 * 100.0 / self.labelled as f64)
    }

    /// Error share in percent.
    pub fn error_pct(&self) -> f64 {
        if self.answered > 0.0 {
            self.errors * 100.0 / self.answered
        } else {
            0.0
        }
    }
}

/// When a canary is worse enough to roll back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnalysisSettings {
    /// Fewest canary answers in the window before judging.
    pub min_requests: f64,
    /// Roll back when the canary's error share exceeds the stable one's by more than this many points.
    pub error_margin_pct: f64,
    /// Roll back when the canary's p99 exceeds the stable one's by more than this many percent.
    pub p99_margin_pct: f64,
    /// Fewest labelled rows of each version before accuracy is compared.
    pub min_labelled: u64,
    /// Roll back when the canary's accuracy is below the stable one's by more than this many points.
    pub accuracy_margin_pct: f64,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        AnalysisSettings {
            min_requests: 20.0,
            error_margin_pct: 5.0,
            p99_margin_pct: 100.0,
            min_labelled: 100,
            accuracy_margin_pct: 5.0,
        }
    }
}

/// Why the canary should be rolled back, with the figures, or `None`.
pub fn analyse(stable: &Window, canary: &Window, settings: &AnalysisSettings) -> Option<String> {
    // Accuracy needs labels on both sides, however few requests the canary answered so far.
    if let (Some(sa), Some(ca)) = (stable.accuracy_pct(), canary.accuracy_pct()) {
        let enough = stable.labelled >= settings.min_labelled && canary.labelled >= settings.min_labelled;
        if enough && ca < sa - settings.accuracy_margin_pct {
            return Some(format!(
                "canary accuracy {ca:.1}% vs stable {sa:.1}% over {} labelled canary rows (margin {:.1} points)",
                canary.labelled, settings.accuracy_margin_pct
            ));
        }
    }
    if canary.answered < settings.min_requests {
        return None;
    }
    let (se, ce) = (stable.error_pct(), canary.error_pct());
    if ce > se + settings.error_margin_pct {
        return Some(format!(
            "canary error rate {ce:.1}% vs stable {se:.1}% over {:.0} canary requests (margin {:.1} points)",
            canary.answered, settings.error_margin_pct
        ));
    }
    if let (Some(sp), Some(cp)) = (stable.p99_ms, canary.p99_ms) {
        if stable.answered >= settings.min_requests && cp > sp * (1.0 + settings.p99_margin_pct / 100.0) {
            return Some(format!(
                "canary p99 {cp:.2} ms vs stable {sp:.2} ms over {:.0} canary requests (margin {:.0}%)",
                canary.answered, settings.p99_margin_pct
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ModelVersion;

    fn state_with(versions: &[u64], rollout: Rollout) -> RegistryState {
        let mut s = RegistryState::default();
        for &v in versions {
            s.models.entry("m".into()).or_default().insert(
                v,
                ModelVersion {
                    name: "m".into(),
                    version: v,
                    digest: format!("d{v}"),
                    size: 10,
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    pushed_by: "op".into(),
                    pushed_at: 0,
                    reference: None,
                },
            );
        }
        s.rollouts.insert("m".into(), rollout);
        s
    }

    fn canary(version: u64, weight: u32) -> Option<Canary> {
        Some(Canary { version, weight, auto_rollback: false })
    }

    #[test]
    fn transitions() {
        let stable1 = Rollout { stable: Some(1), ..Default::default() };
        let canary2 = Rollout { stable: Some(1), canary: canary(2, 20), ..Default::default() };
        let cases: Vec<(Rollout, RolloutAction, Result<(Option<u64>, Option<Canary>), &str>)> = vec![
            (Rollout::default(), RolloutAction::Pin { version: 1 }, Ok((Some(1), None))),
            (Rollout::default(), RolloutAction::Pin { version: 9 }, Err("has no version 9")),
            (
                Rollout::default(),
                RolloutAction::Canary { version: 2, weight: 20, auto_rollback: false },
                Err("no stable version"),
            ),
            (
                stable1.clone(),
                RolloutAction::Canary { version: 2, weight: 20, auto_rollback: false },
                Ok((Some(1), canary(2, 20))),
            ),
            (
                stable1.clone(),
                RolloutAction::Canary { version: 1, weight: 20, auto_rollback: false },
                Err("already the stable"),
            ),
            (stable1.clone(), RolloutAction::Canary { version: 2, weight: 101, auto_rollback: false }, Err("0-100")),
            (canary2.clone(), RolloutAction::Promote, Ok((Some(2), None))),
            (canary2.clone(), RolloutAction::Rollback, Ok((Some(1), None))),
            (stable1.clone(), RolloutAction::Promote, Err("no canary to promote")),
            (stable1.clone(), RolloutAction::Rollback, Err("no canary and no earlier stable version")),
            (
                Rollout { stable: Some(2), previous_stable: Some(1), ..Default::default() },
                RolloutAction::Rollback,
                Ok((Some(1), None)),
            ),
            (canary2.clone(), RolloutAction::Pin { version: 3 }, Ok((Some(3), None))),
        ];
        for (rollout, change, want) in cases {
            let state = state_with(&[1, 2, 3], rollout.clone());
            let got = apply(&state, "m", &change, &Context::default()).map(|(r, _)| (r.stable, r.canary));
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{rollout:?} {change:?}"),
                (Err(e), Err(part)) => assert!(e.message.contains(part), "{change:?}: {}", e.message),
                (got, want) => panic!("{rollout:?} {change:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn back_to_back_canaries_end_where_the_last_command_said() {
        let mut state = state_with(&[1, 2, 3], Rollout { stable: Some(1), ..Default::default() });
        for change in [
            RolloutAction::Canary { version: 2, weight: 30, auto_rollback: false },
            RolloutAction::Promote,
            RolloutAction::Canary { version: 3, weight: 30, auto_rollback: false },
            RolloutAction::Rollback,
        ] {
            let (r, _) = apply(&state, "m", &change, &Context::default()).expect("applies");
            state.rollouts.insert("m".into(), r);
        }
        let r = &state.rollouts["m"];
        assert_eq!((r.stable, r.canary), (Some(2), None));
        let weights: Vec<(u64, u32)> =
            node_policy(r, |_| true).map(|p| p.weights.into_iter().collect()).unwrap_or_default();
        assert_eq!(weights, vec![(2, 100)]);
    }

    #[test]
    fn weights_only_name_versions_ready_on_the_node() {
        let r = Rollout {
            stable: Some(1),
            canary: canary(2, 20),
            shadow: Some(ShadowRoute { version: 3, share: 10 }),
            ..Default::default()
        };
        let policy = |ready: &[u64]| {
            node_policy(&r, |v| ready.contains(&v))
                .map(|p| (p.weights.into_iter().collect::<Vec<_>>(), p.shadow.map(|s| s.version)))
        };
        let cases: Vec<(&[u64], Option<(Vec<(u64, u32)>, Option<u64>)>)> = vec![
            (&[], None),
            (&[1], Some((vec![(1, 100)], None))),
            (&[1, 2], Some((vec![(1, 80), (2, 20)], None))),
            (&[1, 2, 3], Some((vec![(1, 80), (2, 20)], Some(3)))),
            (&[2], Some((vec![(2, 100)], None))),
        ];
        for (ready, want) in cases {
            assert_eq!(policy(ready), want, "ready {ready:?}");
        }
        let full = Rollout { stable: Some(1), canary: canary(2, 100), ..Default::default() };
        assert_eq!(
            node_policy(&full, |_| true).map(|p| p.weights.into_iter().collect::<Vec<_>>()),
            Some(vec![(2, 100)])
        );
    }

    #[test]
    fn a_node_keeps_what_it_serves_until_the_new_stable_version_is_ready() {
        let mut state =
            state_with(&[1, 2], Rollout { stable: Some(1), previous_stable: Some(2), ..Default::default() });
        state.deployments.insert(
            "m".into(),
            vec![Deployment { to: Target::All, labels: BTreeMap::new(), replicas: 1, cascade: None }],
        );
        let node = NodeInfo { node_id: "n".into(), role: "edge".into(), ..Default::default() };
        let desired = |ready: &[u64]| {
            let ready: BTreeSet<(String, u64)> = ready.iter().map(|&v| ("m".to_string(), v)).collect();
            let m = desired_for(&state, &node, &ready, None).remove(0);
            (
                m.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
                m.policy.map(|p| p.weights.into_iter().collect::<Vec<_>>()),
            )
        };
        // Rolled back to v1 while only v2 is loaded here: v2 stays (and keeps its routing) until v1 is ready.
        assert_eq!(desired(&[2]), (vec![1, 2], None));
        assert_eq!(desired(&[1, 2]), (vec![1], Some(vec![(1, 100)])));
        assert_eq!(desired(&[]), (vec![1], None));
    }

    #[test]
    fn deployments_target_by_role_and_labels() {
        let node = |role: &str, site: &str| NodeInfo {
            node_id: "n".into(),
            role: role.into(),
            labels: BTreeMap::from([("site".to_string(), site.to_string())]),
            ..Default::default()
        };
        let dep = |to, labels: &[(&str, &str)]| Deployment {
            to,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            replicas: 1,
            cascade: None,
        };
        let cases = [
            (dep(Target::All, &[]), node("edge", "berlin"), true),
            (dep(Target::Edge, &[]), node("hub", "berlin"), false),
            (dep(Target::Hub, &[]), node("hub", "berlin"), true),
            (dep(Target::Edge, &[("site", "berlin")]), node("edge", "berlin"), true),
            (dep(Target::Edge, &[("site", "paris")]), node("edge", "berlin"), false),
            (dep(Target::Edge, &[("rack", "1")]), node("edge", "berlin"), false),
        ];
        for (d, n, want) in cases {
            assert_eq!(targets(&d, &n), want, "{d:?} {n:?}");
        }
    }

    #[test]
    fn analysis_rolls_back_only_on_enough_evidence() {
        let s = AnalysisSettings::default();
        let w =
            |answered: f64, errors: f64, p99: f64| Window { answered, errors, p99_ms: Some(p99), ..Window::default() };
        let cases = [
            (w(1000.0, 0.0, 2.0), w(10.0, 10.0, 50.0), false, "too few canary requests"),
            (w(1000.0, 0.0, 2.0), w(100.0, 2.0, 2.5), false, "within both margins"),
            (w(1000.0, 10.0, 2.0), w(100.0, 20.0, 2.0), true, "error rate 20% vs 1%"),
            (w(1000.0, 0.0, 2.0), w(100.0, 0.0, 40.0), true, "p99 20x"),
            (w(1000.0, 0.0, 2.0), w(100.0, 0.0, 3.9), false, "p99 under 2x"),
        ];
        for (stable, canary, want, why) in cases {
            assert_eq!(analyse(&stable, &canary, &s).is_some(), want, "{why}");
        }
        // Accuracy from feedback: (stable labelled/correct, canary labelled/correct, roll back).
        let a = |labelled: u64, correct: u64| Window {
            answered: 1000.0,
            p99_ms: Some(2.0),
            labelled,
            correct,
            ..Window::default()
        };
        let accuracy = [
            (a(500, 485), a(500, 400), true, "80% vs 97%"),
            (a(500, 485), a(500, 470), false, "94% vs 97%: within 5 points"),
            (a(500, 485), a(50, 10), false, "too few canary labels"),
            (a(50, 49), a(500, 400), false, "too few stable labels"),
            (a(0, 0), a(500, 100), false, "no stable labels"),
        ];
        for (stable, canary, want, why) in accuracy {
            let got = analyse(&stable, &canary, &s);
            assert_eq!(got.is_some(), want, "{why}: {got:?}");
        }
    }
}
