//! The registry's hub list applied to the links an edge has, as a pure diff: a hub is the same hub
//! by its node id (the name its certificate carries, or the name it was configured by); the registry
//! says whether each is up; a hub the registry taught us that moved gets a new link at its new
//! address (the old one goes); a hub no link reaches gets one. Links from the config stay for the
//! life of the process, wherever the registry says their hub is.

use fabric_proto::registry::HubEntry;

/// A link as the diff sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Known {
    /// The hub's node id once connected (its certificate's), else the name configured.
    pub name: String,
    /// The name its certificate must carry, as configured.
    pub server_name: String,
    /// Where it connects.
    pub addr: String,
    /// Learnt from the registry (else configured).
    pub from_registry: bool,
    /// Marked down now.
    pub down: bool,
    /// Already going.
    pub retired: bool,
}

/// One change to the links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// Link `link` (hub `hub`) is up or down as the registry says; `changed`: it was not.
    Mark { link: usize, hub: String, down: bool, changed: bool },
    /// Link `link`'s hub moved to `to`: the link goes.
    Retire { link: usize, hub: String, to: String },
    /// A hub no link reaches: a new link, learnt from the registry.
    Add { node_id: String, addr: String, down: bool },
}

/// The changes that make `known` follow the registry's `listed` hubs, entry by entry.
pub(super) fn diff(known: &[Known], listed: &[HubEntry]) -> Vec<Change> {
    let mut retired: Vec<bool> = known.iter().map(|k| k.retired).collect();
    let mut down: Vec<bool> = known.iter().map(|k| k.down).collect();
    let mut changes = Vec::new();
    for entry in listed {
        let same: Vec<usize> = (0..known.len())
            .filter(|&i| !retired[i] && (known[i].name == entry.node_id || known[i].server_name == entry.node_id))
            .collect();
        for &i in &same {
            let changed = down[i] != !entry.up;
            down[i] = !entry.up;
            changes.push(Change::Mark { link: i, hub: entry.node_id.clone(), down: !entry.up, changed });
        }
        let moved: Vec<usize> =
            same.iter().copied().filter(|&i| known[i].from_registry && known[i].addr != entry.addr).collect();
        for &i in &moved {
            retired[i] = true;
            changes.push(Change::Retire { link: i, hub: entry.node_id.clone(), to: entry.addr.clone() });
        }
        if same.is_empty() || moved.len() == same.len() {
            changes.push(Change::Add { node_id: entry.node_id.clone(), addr: entry.addr.clone(), down: !entry.up });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, server_name: &str, addr: &str, from_registry: bool) -> Known {
        Known {
            name: name.into(),
            server_name: server_name.into(),
            addr: addr.into(),
            from_registry,
            down: false,
            retired: false,
        }
    }

    fn hub(node_id: &str, addr: &str, up: bool) -> HubEntry {
        HubEntry { node_id: node_id.into(), addr: addr.into(), up }
    }

    fn mark(link: usize, hub: &str, down: bool, changed: bool) -> Change {
        Change::Mark { link, hub: hub.into(), down, changed }
    }

    fn add(node_id: &str, addr: &str, down: bool) -> Change {
        Change::Add { node_id: node_id.into(), addr: addr.into(), down }
    }

    #[test]
    fn the_registry_list_becomes_link_changes() {
        let down = Known { down: true, ..link("hub-1", "hub-1", "10.0.0.1:4433", true) };
        let gone = Known { retired: true, ..link("hub-1", "hub-1", "10.0.0.1:4433", true) };
        let cases: Vec<(&str, Vec<Known>, Vec<HubEntry>, Vec<Change>)> = vec![
            (
                "a new hub gets a link",
                vec![],
                vec![hub("hub-1", "10.0.0.1:4433", true)],
                vec![add("hub-1", "10.0.0.1:4433", false)],
            ),
            (
                "a new hub that is down gets a link, marked down",
                vec![],
                vec![hub("hub-1", "a:1", false)],
                vec![add("hub-1", "a:1", true)],
            ),
            (
                "a configured hub listed up: nothing changes",
                vec![link("hub-1", "hub-1", "10.0.0.1:4433", false)],
                vec![hub("hub-1", "10.0.0.1:4433", true)],
                vec![mark(0, "hub-1", false, false)],
            ),
            (
                "a hub listed down is marked down",
                vec![link("hub-1", "hub-1", "10.0.0.1:4433", true)],
                vec![hub("hub-1", "10.0.0.1:4433", false)],
                vec![mark(0, "hub-1", true, true)],
            ),
            (
                "a down hub listed up again",
                vec![down],
                vec![hub("hub-1", "10.0.0.1:4433", true)],
                vec![mark(0, "hub-1", false, true)],
            ),
            (
                "a learnt hub that moved: its link goes, a new one comes",
                vec![link("hub-1", "hub-1", "10.0.0.1:4433", true)],
                vec![hub("hub-1", "10.0.0.9:4433", true)],
                vec![
                    mark(0, "hub-1", false, false),
                    Change::Retire { link: 0, hub: "hub-1".into(), to: "10.0.0.9:4433".into() },
                    add("hub-1", "10.0.0.9:4433", false),
                ],
            ),
            (
                "a configured hub the registry lists elsewhere keeps its link",
                vec![link("hub-1", "hub1.example.net", "hub1.example.net:4433", false)],
                vec![hub("hub-1", "10.0.0.9:4433", true)],
                vec![mark(0, "hub-1", false, false)],
            ),
            (
                "known by its certificate's node id though configured by DNS name",
                vec![link("hub-1", "hub1.example.net", "hub1.example.net:4433", false)],
                vec![hub("hub-1", "hub1.example.net:4433", false)],
                vec![mark(0, "hub-1", true, true)],
            ),
            (
                "a retired link reaches nothing",
                vec![gone],
                vec![hub("hub-1", "10.0.0.1:4433", true)],
                vec![add("hub-1", "10.0.0.1:4433", false)],
            ),
            (
                "two hubs, one known",
                vec![link("hub-1", "hub-1", "a:1", true)],
                vec![hub("hub-1", "a:1", true), hub("hub-2", "b:2", true)],
                vec![mark(0, "hub-1", false, false), add("hub-2", "b:2", false)],
            ),
        ];
        for (what, known, listed, want) in cases {
            assert_eq!(diff(&known, &listed), want, "{what}");
        }
    }

    #[test]
    fn a_link_retired_by_one_entry_is_not_matched_by_the_next() {
        let known = vec![link("hub-1", "hub-1", "a:1", true)];
        let listed = vec![hub("hub-1", "b:2", true), hub("hub-1", "c:3", true)];
        let changes = diff(&known, &listed);
        assert_eq!(changes.iter().filter(|c| matches!(c, Change::Retire { .. })).count(), 1, "{changes:?}");
        assert_eq!(changes.iter().filter(|c| matches!(c, Change::Add { .. })).count(), 2, "{changes:?}");
    }
}
