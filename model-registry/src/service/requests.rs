//! The requests the registry takes, who may make each (operators change and read; nodes heartbeat
//! and fetch), and where each goes.

use super::*;

impl Registry {
    /// Carries out one request from `peer`; a push reads its bytes from `recv`.
    pub async fn handle(&self, peer: &Identity, request: Request, recv: &mut quinn::RecvStream) -> Reply {
        let operator = || {
            if peer.role == Role::Operator {
                Ok(())
            } else {
                Err(Refusal::new(
                    "forbidden",
                    format!(
                        "{} '{}' may not do this: it needs an operator certificate (fabric certs --node NAME:operator)",
                        peer.role.as_str(),
                        peer.node_id
                    ),
                ))
            }
        };
        match request {
            Request::Push { name, version, size } => {
                operator()?;
                self.push(peer, &name, version, size, recv).await
            }
            Request::Reference { name, version, size, input, output } => {
                operator()?;
                self.set_reference(&name, version, size, input, output, recv).await
            }
            Request::Heartbeat(heartbeat) => self.heartbeat(peer, heartbeat).await.and_then(|d| answer(&d.state)),
            Request::Fetch { .. } => Err(Refusal::new("invalid", "fetch is answered on its stream")),
            other => {
                operator()?;
                self.read_or_change(other)
            }
        }
    }

    /// The operator requests that need no stream: reads and transitions.
    pub fn read_or_change(&self, request: Request) -> Reply {
        match request {
            Request::ListModels => {
                let state = self.state();
                answer(&state.models.values().flat_map(|v| v.values()).collect::<Vec<_>>())
            }
            Request::ShowModel { name, version } => self.show(&name, version),
            Request::RemoveModel { name, version } => self.remove(&name, version),
            Request::Deploy { name, to, labels, replicas, cascade } => {
                if let Some(c) = &cascade {
                    c.check().map_err(|e| Refusal::new("invalid", e.to_string()))?;
                    if !registry::is_plain_name(&c.to) {
                        return Err(Refusal::new("invalid", format!("cascade target '{}' is not a model name", c.to)));
                    }
                }
                self.deploy(&name, Deployment { to, labels, replicas: replicas.max(1), cascade })
            }
            Request::Rollout { name, change } => self.rollout(&name, &change, None),
            Request::RolloutStatus { name, limit } => answer(&self.status(&name, limit.unwrap_or(DETAIL_NODES))?),
            Request::Nodes(query) => answer(&self.nodes(&query)),
            Request::Overview => answer(&self.overview()),
            Request::Drift { name } => answer(&self.drift(&name)?),
            Request::Push { .. } | Request::Reference { .. } | Request::Heartbeat(_) | Request::Fetch { .. } => {
                Err(Refusal::new("invalid", "this request needs its stream"))
            }
        }
    }
}
