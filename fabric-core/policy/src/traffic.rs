//! Traffic policy of one model name: which version a versionless request goes to (one pinned version,
//! or weights over several for a canary), and which share of requests is copied to a shadow version.
//!
//! Choices are pure functions of a 64-bit draw: the hash of the request id when it has one (the same
//! id always lands on the same version) or a counter otherwise. Both are spread over the weights by a
//! Weyl sequence (multiply by the golden ratio), so consecutive counter values interleave the versions
//! evenly and any run of requests is within a request or two of the weights.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Reads version -> weight whether the versions come as numbers or as the strings JSON object keys
/// are: serde hands a message it buffered before reading (an internally tagged request, such as a
/// heartbeat carrying the node's policies) to this map with its keys as strings, which it would not
/// turn into numbers by itself.
fn weights_by_version<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<u64, u32>, D::Error> {
    let by_key: BTreeMap<VersionKey, u32> = BTreeMap::deserialize(deserializer)?;
    Ok(by_key.into_iter().map(|(k, w)| (k.0, w)).collect())
}

/// A version as a map key: a number, or a string holding one.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct VersionKey(u64);

impl<'de> Deserialize<'de> for VersionKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = VersionKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a version number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<VersionKey, E> {
                Ok(VersionKey(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<VersionKey, E> {
                v.parse().map(VersionKey).map_err(|_| E::custom(format!("'{v}' is not a version number")))
            }
        }
        deserializer.deserialize_any(Key)
    }
}

/// 2^64 / golden ratio: consecutive multiples are spread evenly over the 64-bit range.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Where versionless requests of a model go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Version -> weight (any positive scale: 90/10 and 9/1 are the same split). One entry pins.
    #[serde(deserialize_with = "weights_by_version")]
    pub weights: BTreeMap<u64, u32>,
    /// A version that gets a copy of a share of requests; its answers are recorded, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

/// The shadow part of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// Version receiving the copies.
    pub version: u64,
    /// Share of requests copied, in percent (1..=100).
    pub percent: u32,
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No model of that name is loaded.
    #[error("model '{0}' is not loaded: load a version first")]
    UnknownModel(String),
    /// No version has a positive weight.
    #[error("the policy routes nowhere: give at least one version a positive weight")]
    NoWeight,
    /// A weighted or shadow version is not loaded, or has no replica ready.
    #[error(
        "version {version} is not ready ({why}); load it and wait for /v2/models/<m>/versions/{version}/ready first"
    )]
    NotReady { version: u64, why: String },
    /// The shadow share is out of range.
    #[error("shadow percent must be 1..=100, got {0}")]
    ShadowPercent(u32),
    /// The shadow version also takes live traffic.
    #[error("version {0} cannot be both routed to and shadowed")]
    ShadowRouted(u64),
}

impl TrafficPolicy {
    /// All traffic to one version.
    pub fn pinned(version: u64) -> TrafficPolicy {
        TrafficPolicy { weights: BTreeMap::from([(version, 1)]), shadow: None }
    }

    /// Checks the policy against the versions that can serve now: `ready(v)` is `Err(why)` for a
    /// version that cannot. A weight on a version that is not ready is refused, never served by another.
    pub fn validate(&self, ready: impl Fn(u64) -> Result<(), String>) -> Result<(), PolicyError> {
        if self.weights.values().all(|&w| w == 0) {
            return Err(PolicyError::NoWeight);
        }
        for (&version, _) in self.weights.iter().filter(|(_, &w)| w > 0) {
            ready(version).map_err(|why| PolicyError::NotReady { version, why })?;
        }
        if let Some(shadow) = self.shadow {
            if !(1..=100).contains(&shadow.percent) {
                return Err(PolicyError::ShadowPercent(shadow.percent));
            }
            if self.weights.get(&shadow.version).is_some_and(|&w| w > 0) {
                return Err(PolicyError::ShadowRouted(shadow.version));
            }
            ready(shadow.version).map_err(|why| PolicyError::NotReady { version: shadow.version, why })?;
        }
        Ok(())
    }

    /// The version for a draw (see [`draw`]).
    pub fn choose(&self, draw: u64) -> Option<u64> {
        let total: u64 = self.weights.values().map(|&w| u64::from(w)).sum();
        if total == 0 {
            return None;
        }
        let mut point = scale(draw, total);
        for (&version, &weight) in &self.weights {
            if point < u64::from(weight) {
                return Some(version);
            }
            point -= u64::from(weight);
        }
        None
    }

    /// The shadow version, if this draw is among the copied share. Uses other bits of the draw than
    /// [`choose`](Self::choose), so the copies spread over every routed version.
    pub fn shadow_for(&self, draw: u64) -> Option<u64> {
        let shadow = self.shadow?;
        (scale(draw.rotate_left(32).wrapping_mul(GOLDEN), 100) < u64::from(shadow.percent)).then_some(shadow.version)
    }

    /// The version metadata requests without a version describe: the one with the largest weight.
    pub fn primary(&self) -> Option<u64> {
        self.weights.iter().filter(|(_, &w)| w > 0).max_by_key(|(&v, &w)| (w, v)).map(|(&v, _)| v)
    }

    /// Whether `version` gets live or shadow traffic under this policy.
    pub fn uses(&self, version: u64) -> bool {
        self.weights.get(&version).is_some_and(|&w| w > 0) || self.shadow.is_some_and(|s| s.version == version)
    }
}

/// The draw for a request: the hash of its id when it has one (sticky), else the next counter value
/// spread by the Weyl sequence (even interleaving).
pub fn draw(request_id: Option<&str>, counter: u64) -> u64 {
    match request_id {
        Some(id) => crate::hash::stable_hash(id.as_bytes()),
        None => counter.wrapping_mul(GOLDEN),
    }
}

/// Maps a 64-bit value evenly onto `0..n`.
fn scale(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(weights: &[(u64, u32)], shadow: Option<(u64, u32)>) -> TrafficPolicy {
        TrafficPolicy {
            weights: weights.iter().copied().collect(),
            shadow: shadow.map(|(version, percent)| Shadow { version, percent }),
        }
    }

    #[test]
    fn counter_draws_follow_the_weights_in_every_window() {
        // (weights, window): in every window of that many consecutive requests, each version's share is
        // within 2 points of its weight.
        let cases: &[(&[(u64, u32)], usize)] = &[
            (&[(1, 100), (2, 0)], 100),
            (&[(1, 90), (2, 10)], 200),
            (&[(1, 50), (2, 50)], 100),
            (&[(1, 0), (2, 100)], 100),
            (&[(1, 1), (2, 1), (3, 1)], 300),
            (&[(1, 99), (2, 1)], 1000),
        ];
        for &(weights, window) in cases {
            let p = policy(weights, None);
            let total: u32 = weights.iter().map(|w| w.1).sum();
            for start in [0u64, 7, 12_345, u64::MAX - 5_000] {
                let mut counts = BTreeMap::new();
                for i in 0..window as u64 {
                    *counts.entry(p.choose(draw(None, start.wrapping_add(i))).expect("routes")).or_insert(0usize) += 1;
                }
                for &(v, w) in weights {
                    let share = *counts.get(&v).unwrap_or(&0) as f64 / window as f64 * 100.0;
                    let want = f64::from(w) / f64::from(total) * 100.0;
                    assert!((share - want).abs() <= 2.0, "{weights:?} from {start}: v{v} got {share}%, want {want}%");
                }
            }
        }
    }

    #[test]
    fn an_id_always_lands_on_the_same_version_and_ids_spread() {
        let p = policy(&[(1, 50), (2, 50)], None);
        let mut counts = [0usize; 3];
        for i in 0..1000 {
            let id = format!("request-{i}");
            let first = p.choose(draw(Some(&id), 0)).expect("routes");
            for counter in 1..5 {
                assert_eq!(p.choose(draw(Some(&id), counter)), Some(first), "{id} moved");
            }
            counts[first as usize] += 1;
        }
        assert!(counts[1] > 400 && counts[2] > 400, "ids do not spread: {counts:?}");
    }

    #[test]
    fn shadow_share_follows_its_percent() {
        for percent in [1u32, 10, 50, 100] {
            let p = policy(&[(1, 1)], Some((2, percent)));
            let copied = (0..10_000u64).filter(|&i| p.shadow_for(draw(None, i)) == Some(2)).count();
            let share = copied as f64 / 100.0;
            assert!((share - f64::from(percent)).abs() <= 2.0, "{percent}%: copied {share}%");
        }
        assert_eq!(policy(&[(1, 1)], None).shadow_for(12), None);
    }

    #[test]
    fn validation_refuses_what_cannot_serve() {
        let ready = |v: u64| if v <= 2 { Ok(()) } else { Err("not loaded".to_string()) };
        let cases: &[(TrafficPolicy, Result<(), PolicyError>)] = &[
            (policy(&[(1, 90), (2, 10)], None), Ok(())),
            (policy(&[(1, 100), (3, 0)], None), Ok(())),
            (policy(&[(1, 0)], None), Err(PolicyError::NoWeight)),
            (policy(&[], None), Err(PolicyError::NoWeight)),
            (policy(&[(1, 50), (3, 50)], None), Err(PolicyError::NotReady { version: 3, why: "not loaded".into() })),
            (policy(&[(1, 1)], Some((2, 10))), Ok(())),
            (policy(&[(1, 1)], Some((2, 0))), Err(PolicyError::ShadowPercent(0))),
            (policy(&[(1, 1)], Some((2, 101))), Err(PolicyError::ShadowPercent(101))),
            (policy(&[(1, 1)], Some((1, 10))), Err(PolicyError::ShadowRouted(1))),
            (policy(&[(1, 1)], Some((3, 10))), Err(PolicyError::NotReady { version: 3, why: "not loaded".into() })),
        ];
        for (p, want) in cases {
            assert_eq!(&p.validate(ready), want, "{p:?}");
        }
    }

    #[test]
    fn primary_and_uses() {
        let p = policy(&[(1, 90), (2, 10), (3, 0)], Some((4, 5)));
        assert_eq!(p.primary(), Some(1));
        assert_eq!(policy(&[(1, 50), (2, 50)], None).primary(), Some(2));
        assert!(p.uses(1) && p.uses(2) && p.uses(4) && !p.uses(3) && !p.uses(5));
    }
}
