//! Heartbeats: a node reports, the registry holds the answer (its desired state) until it changes
//! or the hold ends; nodes that stop reporting are marked down, then forgotten.

use super::*;

/// Above this many nodes changing state in one tick, one log line says so for all.
pub(super) const MANY_NODES: usize = 10;

impl Registry {
    /// A node reports; answers its desired state at once if it differs from what the node applied,
    /// else when a change concerns it or after its hold: the node's `wait_ms` (at most 5 s) while it
    /// is watched (a hub, traffic, a canary under analysis), else up to its `max_wait_ms` and the
    /// registry's idle hold.
    pub async fn heartbeat(&self, peer: &Identity, heartbeat: Heartbeat) -> Result<Arc<Desired>, Refusal> {
        let info = heartbeat.info;
        if info.node_id != peer.node_id {
            return Err(Refusal::new(
                "forbidden",
                format!(
                    "node '{}' cannot report as '{}': a node reports only for itself (its certificate decides)",
                    peer.node_id, info.node_id
                ),
            ));
        }
        if !matches!(peer.role, Role::Edge | Role::Hub) || info.role != peer.role.as_str() {
            return Err(Refusal::new(
                "forbidden",
                format!("only edge and hub certificates heartbeat; '{}' is {}", peer.node_id, peer.role.as_str()),
            ));
        }
        let ready: BTreeSet<(String, u64)> = heartbeat.ready.into_iter().map(|r| (r.name, r.version)).collect();
        // Subscribed before anything is computed, so a change from here on is not missed.
        let mut changes = self.fleet.subscribe(&info.node_id);
        let fast_ms = heartbeat.wait_ms.min(FAST_HOLD_MS);
        let watched = info.role == Role::Hub.as_str() || active(&heartbeat.report);
        let (hubs_changed, came_back) = self.fleet.record(NodeRecord {
            info: info.clone(),
            ready: ready.clone(),
            report: heartbeat.report,
            applied: heartbeat.applied,
            last_seen: Instant::now(),
            slack: Duration::ZERO,
            up: true,
        });
        if came_back {
            tracing::info!(node = %info.node_id, "node up again");
        }
        if hubs_changed {
            // Edges hear of it at the next liveness tick: a hub flapping wakes them at most 4 times
            // a second, not once per heartbeat.
            self.hubs_moved.store(true, Ordering::Release);
        }
        let mut desired = self.desired_of(&info, &ready);
        if self.autoscale(&info, &desired) {
            desired = self.desired_of(&info, &ready);
        }
        let analysed = {
            let state = self.state();
            desired
                .state
                .models
                .iter()
                .any(|m| state.rollouts.get(&m.name).is_some_and(|r| r.canary.is_some_and(|c| c.auto_rollback)))
        };
        let hold_ms = if watched || analysed {
            fast_ms
        } else {
            heartbeat
                .max_wait_ms
                .max(heartbeat.wait_ms)
                .min(self.settings.idle_heartbeat.as_millis() as u64)
                .max(fast_ms)
        };
        // Down when the next heartbeat is the timeout late; an idle node, held long, twice the timeout
        // late (a loaded registry answers a fleet's held heartbeats late, and that is no outage).
        let slack = if hold_ms > fast_ms { hold_ms + self.settings.heartbeat_timeout.as_millis() as u64 } else { 0 };
        self.fleet.set_slack(&info.node_id, Duration::from_millis(slack));
        let until = tokio::time::Instant::now() + Duration::from_millis(hold_ms);
        loop {
            if desired.state.revision != heartbeat.applied {
                return Ok(desired);
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => desired = self.desired_of(&info, &ready),
                _ => return Ok(desired),
            }
        }
    }

    /// One liveness tick: nodes down (or back), the hub list updated (waking only edges), nodes gone
    /// for longer than the retention forgotten with their autoscaling records.
    pub fn check_liveness(&self) {
        let tick = self.fleet.tick(self.settings.heartbeat_timeout, self.settings.forget_after);
        // One line per node, or one line for many (a fleet's worth of lines helps nobody).
        let timeout_ms = self.settings.heartbeat_timeout.as_millis();
        if tick.down.len() > MANY_NODES {
            let first: Vec<&String> = tick.down.iter().take(MANY_NODES).collect();
            tracing::warn!(
                nodes = tick.down.len(),
                "nodes down: no heartbeat in time (timeout {timeout_ms} ms), first {first:?}"
            );
        } else {
            for id in &tick.down {
                tracing::warn!(node = %id, "node down: no heartbeat for {timeout_ms} ms");
            }
        }
        if tick.up.len() > MANY_NODES {
            tracing::info!(nodes = tick.up.len(), "nodes up again");
        } else {
            for id in &tick.up {
                tracing::info!(node = %id, "node up");
            }
        }
        if !tick.forgotten.is_empty() {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            for id in &tick.forgotten {
                if let Some((_, records)) = self.scaled.remove(id) {
                    for key in records.keys() {
                        unsaved.insert(scaled_record_key(id, key), None);
                    }
                }
            }
            drop(unsaved);
            let gone: BTreeSet<&String> = tick.forgotten.iter().collect();
            self.scalers.retain(|(node, _, _), _| !gone.contains(node));
            tracing::info!(
                nodes = tick.forgotten.len(),
                "forgot nodes down for over {} s: {:?}",
                self.settings.forget_after.as_secs(),
                tick.forgotten
            );
        }
        if tick.hubs_changed | self.hubs_moved.swap(false, Ordering::AcqRel) {
            self.wake_changed(|n| n.role == Role::Edge.as_str());
        }
    }
}

/// Activity in a node's report that the registry watches closely (traffic, a queue, a load).
pub(super) fn active(report: &NodeReport) -> bool {
    report.versions.iter().any(|v| v.window.arrivals_per_s > 0.0 || v.queue_depth > 0 || v.loading_replicas > 0)
}
