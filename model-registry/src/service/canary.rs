//! The canary tick: each rollout under automatic analysis compares the canary with the stable
//! version over the nodes' reports and rolls back a failing canary; each rollout in waves compares
//! its version on the moved nodes with the old one on the others, and aborts, advances or completes.

#[allow(unused_imports)]
use super::views::window;
use super::*;

impl Registry {
    /// One analysis tick: rolls back canaries (with automatic rollback on) that are worse than their
    /// stable version by the configured margins.
    pub fn analyse(&self) {
        let state = self.state();
        let timeout = self.settings.heartbeat_timeout;
        let decisions: Vec<(String, String)> = state
            .rollouts
            .iter()
            .filter_map(|(name, r)| {
                let c = r.canary.filter(|c| c.auto_rollback)?;
                let stable = window(&self.fleet, name, r.stable?, timeout);
                let canary = window(&self.fleet, name, c.version, timeout);
                rollout::analyse(&stable, &canary, &self.settings.analysis).map(|why| (name.clone(), why))
            })
            .collect();
        for (name, why) in decisions {
            tracing::warn!(model = %name, "automatic rollback: {why}");
            if let Err(e) = self.rollout(&name, &RolloutAction::Rollback, Some(why)) {
                tracing::error!(model = %name, "automatic rollback failed: {e}");
            }
        }
        self.advance_waves();
    }

    /// Whether every node that `w` moved and that is up serves its version (has it ready).
    fn wave_serving(&self, name: &str, w: &fabric_proto::answers::Waves) -> bool {
        let timeout = self.settings.heartbeat_timeout;
        let mut serving = true;
        self.fleet.each(|n| {
            if n.is_up(timeout)
                && crate::waves::moved(w, name, &n.info.node_id, &n.info.labels)
                && !n.ready.contains(&(name.to_string(), w.version))
            {
                serving = false;
            }
        });
        serving
    }

    /// One tick of every rollout in waves: abort on a failing analysis, next wave when its time
    /// passed, completion after the last.
    fn advance_waves(&self) {
        let state = self.state();
        let timeout = self.settings.heartbeat_timeout;
        let now = now_ms();
        let steps: Vec<(String, crate::waves::Step)> = state
            .rollouts
            .iter()
            .filter_map(|(name, r)| {
                let w = r.waves.as_ref().filter(|w| w.phase == fabric_proto::answers::WavePhase::Running)?;
                let from = window(&self.fleet, name, w.from, timeout);
                let moved = window(&self.fleet, name, w.version, timeout);
                let failing =
                    rollout::analyse(&from, &moved, &self.settings.analysis).map(|why| {
                        why.replace("canary requests", "requests on moved nodes")
                            .replace("canary", "moved nodes")
                            .replacen("vs stable", "vs the others", 1)
                    });
                let step = crate::waves::tick(
                    w,
                    now,
                    failing,
                    self.wave_serving(name, w),
                    self.wave_positions(name, &w.labels),
                );
                (step != crate::waves::Step::Hold).then(|| (name.clone(), step))
            })
            .collect();
        for (name, step) in steps {
            let reply = self.transition(|state| {
                let generation = state.generation + 1;
                let r = state.rollouts.get_mut(&name).ok_or_else(|| Refusal::new("not_found", "no rollout"))?;
                let w = r.waves.as_mut().ok_or_else(|| Refusal::new("conflict", "no waves"))?;
                let line = crate::waves::apply_step(w, &step, now);
                let (version, from) = (w.version, w.from);
                match &step {
                    crate::waves::Step::Complete => {
                        r.previous_stable = Some(from);
                        r.stable = Some(version);
                    }
                    crate::waves::Step::Abort { why } => r.auto_rolled_back = Some(why.clone()),
                    _ => {}
                }
                if let Some(line) = line {
                    r.record(now, generation, line);
                }
                Ok(Value::Null)
            });
            match (&step, reply) {
                (_, Err(e)) => tracing::error!(model = %name, "a rollout in waves could not step: {e}"),
                (crate::waves::Step::Abort { why }, Ok(_)) => tracing::warn!(model = %name, "waves aborted: {why}"),
                (step, Ok(_)) => tracing::info!(model = %name, ?step, "waves stepped"),
            }
        }
    }
}
