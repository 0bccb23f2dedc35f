//! The canary tick: each rollout under automatic analysis compares the canary with the stable
//! version over the nodes' reports and rolls back a failing canary.

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
    }
}
