//! Rollouts in waves, pure: which nodes a wave moves ([`position`], [`cutoff`], [`moved`]), how a
//! rollout in waves starts ([`start`]), and what each analysis tick does with it ([`tick`]).
//!
//! A node's place in the order is a hash of the model's name and the node's id, so the order is the
//! same on every registry replica and across restarts, and differs per model (the same nodes are not
//! always first). When a wave starts, its cutoff is fixed from the nodes known then (up or down):
//! the smallest cutoff under which the wave's share of them falls, never lower than the previous
//! wave's. A node moves when its position is under the running wave's cutoff, so a node offline
//! during the rollout gets its wave's state when it comes back, and a node that joins later falls in
//! wherever its hash puts it. The last wave (100%) moves every node that takes part.

use std::collections::BTreeMap;

use fabric_proto::answers::{WavePhase, Waves};
use fabric_proto::registry::Refusal;

/// A node's place in the order of `model`'s waves: a stable hash of the model name and node id.
pub fn position(model: &str, node_id: &str) -> u64 {
    let key: Vec<u8> = model.bytes().chain([0u8]).chain(node_id.bytes()).collect();
    fabric_policy::hash::stable_hash(&key)
}

/// The cutoff under which `share_pct` percent of `positions` fall (rounded up: a 1% wave of 10 nodes
/// moves one); 100% moves every node, known or not.
pub fn cutoff(share_pct: u32, mut positions: Vec<u64>) -> u64 {
    if share_pct >= 100 {
        return u64::MAX;
    }
    positions.sort_unstable();
    let count = (positions.len() * share_pct as usize).div_ceil(100);
    match count {
        0 => 0,
        k => positions[k - 1].saturating_add(1),
    }
}

/// Whether a node with `labels` takes part in the waves.
pub fn takes_part(waves: &Waves, labels: &BTreeMap<String, String>) -> bool {
    waves.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether node `node_id` (with `labels`) of `model` runs the waves' version now.
pub fn moved(waves: &Waves, model: &str, node_id: &str, labels: &BTreeMap<String, String>) -> bool {
    waves.active()
        && takes_part(waves, labels)
        && waves.cutoffs.last().is_some_and(|cut| *cut == u64::MAX || position(model, node_id) < *cut)
}

/// What a rollout in waves asks for, as the CLI sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The version moved to.
    pub version: u64,
    /// Cumulative shares, percent.
    pub steps: Vec<u32>,
    /// Each wave's time, milliseconds.
    pub every_ms: u64,
    /// Labels a node must carry to take part.
    pub labels: BTreeMap<String, String>,
    /// The share of a moved node's requests the version takes.
    pub weight: u32,
    /// Abort by itself on worse figures.
    pub auto_abort: bool,
}

/// Starts waves moving to `plan.version` from the stable version `from`; `positions`: those of the
/// nodes known now that the model is deployed to and that carry the plan's labels.
pub fn start(plan: &Plan, from: u64, positions: Vec<u64>, now_ms: u64) -> Result<Waves, Refusal> {
    let invalid = |m: String| Err(Refusal::new("invalid", m));
    if plan.version == from {
        return invalid(format!("version {from} is already the stable version"));
    }
    if plan.steps.is_empty() || plan.steps.last() != Some(&100) {
        return invalid(format!("the waves must end at 100%, got {:?}", plan.steps));
    }
    if plan.steps.windows(2).any(|w| w[0] >= w[1]) || plan.steps[0] == 0 {
        return invalid(format!("each wave must take a larger share than the one before, from 1%: {:?}", plan.steps));
    }
    if plan.weight == 0 || plan.weight > 100 {
        return invalid(format!("the weight on moved nodes must be 1-100, got {}", plan.weight));
    }
    Ok(Waves {
        version: plan.version,
        from,
        steps: plan.steps.clone(),
        every_ms: plan.every_ms,
        labels: plan.labels.clone(),
        weight: plan.weight,
        auto_abort: plan.auto_abort,
        wave: 0,
        cutoffs: vec![cutoff(plan.steps[0], positions)],
        wave_started_ms: now_ms,
        wave_ready_ms: None,
        phase: WavePhase::Running,
        outcome: None,
    })
}

/// What an analysis tick does with a rollout in waves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing: the wave's time is not up, or it is paused or ended.
    Hold,
    /// Every moved node that is up serves the version now: the wave's time starts.
    Ready,
    /// The next wave starts (its index, its cutoff).
    Advance { wave: usize, cutoff: u64 },
    /// The last wave's time passed: the version becomes the stable one.
    Complete,
    /// The analysis failed: every moved node goes back.
    Abort { why: String },
}

/// One tick: `failing` is the analysis's verdict on the moved nodes (with its figures), `serving`
/// whether every moved node that is up serves the version, `positions` those of the nodes taking
/// part known now. A wave's time counts from when its nodes serve.
pub fn tick(waves: &Waves, now_ms: u64, failing: Option<String>, serving: bool, positions: Vec<u64>) -> Step {
    if waves.phase != WavePhase::Running {
        return Step::Hold;
    }
    if let Some(why) = failing.filter(|_| waves.auto_abort) {
        return Step::Abort { why: format!("wave {} of {}: {why}", waves.wave + 1, waves.steps.len()) };
    }
    let Some(ready) = waves.wave_ready_ms else {
        return if serving { Step::Ready } else { Step::Hold };
    };
    if now_ms.saturating_sub(ready) < waves.every_ms {
        return Step::Hold;
    }
    let next = waves.wave + 1;
    match waves.steps.get(next) {
        None => Step::Complete,
        Some(share) => {
            let previous = waves.cutoffs.last().copied().unwrap_or(0);
            Step::Advance { wave: next, cutoff: cutoff(*share, positions).max(previous) }
        }
    }
}

/// Applies `step` to `waves` (at `now_ms`); returns the line for the rollout's history.
pub fn apply_step(waves: &mut Waves, step: &Step, now_ms: u64) -> Option<String> {
    match step {
        Step::Hold => None,
        Step::Ready => {
            waves.wave_ready_ms = Some(now_ms);
            None
        }
        Step::Advance { wave, cutoff } => {
            waves.wave = *wave;
            waves.cutoffs.push(*cutoff);
            waves.wave_started_ms = now_ms;
            waves.wave_ready_ms = None;
            Some(format!(
                "wave {} of {}: {}% of the nodes on version {}",
                wave + 1,
                waves.steps.len(),
                waves.steps[*wave],
                waves.version
            ))
        }
        Step::Complete => {
            waves.phase = WavePhase::Completed;
            waves.outcome = Some(format!("completed: {} waves passed", waves.steps.len()));
            Some(format!("waves completed: version {} is stable", waves.version))
        }
        Step::Abort { why } => {
            waves.phase = WavePhase::Aborted;
            waves.outcome = Some(why.clone());
            Some(format!("waves aborted, every moved node back on version {}: {why}", waves.from))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(steps: &[u32]) -> Plan {
        Plan {
            version: 2,
            steps: steps.to_vec(),
            every_ms: 1000,
            labels: BTreeMap::new(),
            weight: 100,
            auto_abort: true,
        }
    }

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("edge-{i}")).collect()
    }

    fn positions(nodes: &[String]) -> Vec<u64> {
        nodes.iter().map(|n| position("m", n)).collect()
    }

    #[test]
    fn cutoffs_move_the_share_rounded_up() {
        let nodes = fleet(1000);
        let cases = [(1, 10), (10, 100), (50, 500), (33, 330), (100, 1000)];
        for (share, want) in cases {
            let cut = cutoff(share, positions(&nodes));
            let moved = nodes.iter().filter(|n| cut == u64::MAX || position("m", n) < cut).count();
            assert_eq!(moved, want, "{share}%");
        }
        // Small fleets: 1% of 10 nodes is one node; of none, none.
        let ten = fleet(10);
        let cut = cutoff(1, positions(&ten));
        assert_eq!(ten.iter().filter(|n| position("m", n) < cut).count(), 1);
        assert_eq!(cutoff(1, Vec::new()), 0);
    }

    #[test]
    fn ids_alike_but_for_their_end_spread_over_the_order() {
        // 10 nodes named a-0..a-9 among 90 named b-0..b-89: about a tenth of each tenth of the order.
        let mut ids: Vec<String> = (0..10).map(|i| format!("a-{i}")).collect();
        ids.extend((0..90).map(|i| format!("b-{i}")));
        ids.sort_by_key(|id| position("m", id));
        let first_half = ids[..50].iter().filter(|id| id.starts_with("a-")).count();
        assert!((2..=8).contains(&first_half), "{first_half} of the 10 a- nodes in the first half: {ids:?}");
    }

    #[test]
    fn the_order_is_stable_and_differs_per_model() {
        assert_eq!(position("m", "edge-1"), position("m", "edge-1"));
        let order = |model: &str| {
            let mut nodes = fleet(20);
            nodes.sort_by_key(|n| position(model, n));
            nodes
        };
        assert_ne!(order("a"), order("b"));
    }

    #[test]
    fn plans_that_cannot_run_are_refused() {
        let cases: [(&[u32], u32, &str); 5] = [
            (&[10, 50], 100, "end at 100%"),
            (&[], 100, "end at 100%"),
            (&[50, 10, 100], 100, "larger share"),
            (&[0, 100], 100, "larger share"),
            (&[10, 100], 0, "weight"),
        ];
        for (steps, weight, why) in cases {
            let p = Plan { weight, ..plan(steps) };
            let err = start(&p, 1, Vec::new(), 0).expect_err(why);
            assert!(err.message.contains(why), "{steps:?}: {}", err.message);
        }
        assert!(start(&plan(&[100]), 2, Vec::new(), 0).is_err(), "moving to the stable version");
    }

    #[test]
    fn waves_advance_in_order_when_their_time_passes_and_complete() {
        let nodes = fleet(200);
        let mut w = start(&plan(&[1, 10, 50, 100]), 1, positions(&nodes), 0).expect("starts");
        let moved = |w: &Waves| nodes.iter().filter(|n| moved(w, "m", n, &BTreeMap::new())).count();
        assert_eq!(moved(&w), 2);
        let mut seen = vec![moved(&w)];
        let mut now = 0;
        loop {
            // A wave's time starts when its nodes serve.
            assert_eq!(tick(&w, now + 5000, None, false, positions(&nodes)), Step::Hold, "advanced while loading");
            now += 100;
            let ready = tick(&w, now, None, true, positions(&nodes));
            assert_eq!(ready, Step::Ready);
            apply_step(&mut w, &ready, now);
            assert_eq!(tick(&w, now + 999, None, true, positions(&nodes)), Step::Hold, "advanced before its time");
            now += 1000;
            let step = tick(&w, now, None, true, positions(&nodes));
            apply_step(&mut w, &step, now);
            if step == Step::Complete {
                break;
            }
            seen.push(moved(&w));
        }
        assert_eq!(seen, [2, 20, 100, 200]);
        assert_eq!(w.phase, WavePhase::Completed);
        assert_eq!(moved(&w), 0, "a completed rollout moves nobody: the version is stable");
    }

    #[test]
    fn a_failing_wave_aborts_at_once_unless_paused_or_manual() {
        let nodes = fleet(50);
        let w = start(&plan(&[10, 100]), 1, positions(&nodes), 0).expect("starts");
        let why = Some("canary p99 40 ms vs stable 2 ms".to_string());
        match tick(&w, 10, why.clone(), true, positions(&nodes)) {
            Step::Abort { why } => assert!(why.starts_with("wave 1 of 2: canary p99"), "{why}"),
            other => panic!("{other:?}"),
        }
        let manual = Waves { auto_abort: false, ..w.clone() };
        assert_eq!(tick(&manual, 10, why.clone(), true, positions(&nodes)), Step::Ready);
        let paused = Waves { phase: WavePhase::Paused, ..w.clone() };
        assert_eq!(tick(&paused, 10_000, why, true, positions(&nodes)), Step::Hold);
        let mut aborted = w.clone();
        apply_step(&mut aborted, &Step::Abort { why: "x".into() }, 10);
        assert!(nodes.iter().all(|n| !moved(&aborted, "m", n, &BTreeMap::new())), "an abort leaves a node moved");
    }

    #[test]
    fn nodes_without_the_labels_never_move_and_late_nodes_fall_in_by_hash() {
        let site = |s: &str| BTreeMap::from([("site".to_string(), s.to_string())]);
        let p = Plan { labels: site("x"), ..plan(&[50, 100]) };
        let nodes = fleet(40);
        let w = start(&p, 1, positions(&nodes), 0).expect("starts");
        assert!(nodes.iter().all(|n| !moved(&w, "m", n, &site("y"))));
        let moved_x = nodes.iter().filter(|n| moved(&w, "m", n, &site("x"))).count();
        assert_eq!(moved_x, 20);
        // A node unknown when the wave started moves exactly when its hash is under the cutoff.
        let late = "edge-late";
        assert_eq!(moved(&w, "m", late, &site("x")), position("m", late) < w.cutoffs[0]);
        // A later wave's cutoff never moves a node back (here: every node gone from the registry).
        let mut w =
            start(&Plan { labels: BTreeMap::new(), ..plan(&[50, 60, 100]) }, 1, positions(&nodes), 0).expect("w");
        w.wave_ready_ms = Some(0);
        match tick(&w, 1000, None, true, Vec::new()) {
            Step::Advance { wave: 1, cutoff } => assert_eq!(cutoff, w.cutoffs[0]),
            other => panic!("{other:?}"),
        }
    }
}
