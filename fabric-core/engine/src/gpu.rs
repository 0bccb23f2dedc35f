//! The GPUs of this machine, for the registry: found once at start by asking `nvidia-smi`, reported
//! in the node's heartbeat (name and memory) and as the label `gpu` (the first GPU's name, lower
//! case, `-` for spaces), so that a deployment can target `--labels gpu=nvidia-h200`.
//!
//! Memory is asked the same way when a version loads on a GPU: what the GPU has free, and what this
//! process holds (so a replica's share is measured, not guessed).
//!
//! `nvidia-smi` ships with the NVIDIA driver wherever a GPU can be used; no GPU library is linked.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

/// One GPU as `nvidia-smi` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Product name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// Parses `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` output; lines
/// that do not read as `name, MiB` are skipped.
pub fn parse_query(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|line| {
            let (name, memory) = line.rsplit_once(',')?;
            let name = name.trim();
            let memory_mib = memory.trim().parse().ok()?;
            (!name.is_empty()).then(|| Gpu { name: name.to_string(), memory_mib })
        })
        .collect()
}

/// This machine's GPUs, asked of `nvidia-smi` once per process (the node's heartbeat and the
/// TensorRT cache key both use them).
pub fn this_machine() -> &'static [Gpu] {
    static GPUS: OnceLock<Vec<Gpu>> = OnceLock::new();
    GPUS.get_or_init(discover)
}

/// The GPUs `nvidia-smi` lists; none where it is missing or fails (a CPU machine).
fn discover() -> Vec<Gpu> {
    match Command::new("nvidia-smi").args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]).output() {
        Ok(out) if out.status.success() => parse_query(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => {
            tracing::info!(status = %out.status, "nvidia-smi failed: reporting no GPU");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// Memory of the first GPU now, MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuMemory {
    /// Free.
    pub free_mib: u64,
    /// In all.
    pub total_mib: u64,
}

/// Parses `nvidia-smi --query-gpu=memory.free,memory.total --format=csv,noheader,nounits`: the
/// first line that reads as two numbers.
pub fn parse_memory(text: &str) -> Option<GpuMemory> {
    text.lines().find_map(|line| {
        let (free, total) = line.split_once(',')?;
        Some(GpuMemory { free_mib: free.trim().parse().ok()?, total_mib: total.trim().parse().ok()? })
    })
}

/// Parses `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`: the
/// memory process `pid` holds on all GPUs, MiB (0 when it holds none: a process that has not
/// touched a GPU is not listed).
pub fn parse_process_memory(text: &str, pid: u32) -> u64 {
    text.lines()
        .filter_map(|line| {
            let (p, used) = line.split_once(',')?;
            (p.trim().parse::<u32>().ok()? == pid).then(|| used.trim().parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// The first GPU's free and total memory now; `None` without a GPU or where `nvidia-smi` fails.
pub fn memory_now() -> Option<GpuMemory> {
    parse_memory(&nvidia_smi(&["--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"])?)
}

/// GPU memory this process holds now, MiB; `None` without a GPU or where `nvidia-smi` fails.
pub fn this_process_memory_mib() -> Option<u64> {
    let text = nvidia_smi(&["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])?;
    Some(parse_process_memory(&text, std::process::id()))
}

/// `nvidia-smi`'s output for `args`, on a machine that has a GPU (asked only there: the query is a
/// process start, and a CPU machine has nothing to tell).
fn nvidia_smi(args: &[&str]) -> Option<String> {
    if this_machine().is_empty() {
        return None;
    }
    let out = Command::new("nvidia-smi").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How the heartbeat describes the GPUs: `NVIDIA H200 (143771 MiB)`, `2 x NVIDIA H200 (143771 MiB)`
/// when all are alike, else each listed; `None` without one.
pub fn describe(gpus: &[Gpu]) -> Option<String> {
    let first = gpus.first()?;
    let one = |g: &Gpu| format!("{} ({} MiB)", g.name, g.memory_mib);
    Some(if gpus.iter().all(|g| g == first) {
        if gpus.len() == 1 {
            one(first)
        } else {
            format!("{} x {}", gpus.len(), one(first))
        }
    } else {
        gpus.iter().map(one).collect::<Vec<_>>().join(", ")
    })
}

/// The `gpu` label's value: the first GPU's name, lower case, runs of other characters as `-`.
pub fn label(gpus: &[Gpu]) -> Option<String> {
    let name = &gpus.first()?.name;
    let slug: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let parts: Vec<&str> = slug.split('-').filter(|p| !p.is_empty()).collect();
    (!parts.is_empty()).then(|| parts.join("-"))
}

/// `labels` with `gpu` added from `gpus` unless the config set it (the operator's word wins).
pub fn with_gpu_label(mut labels: BTreeMap<String, String>, gpus: &[Gpu]) -> BTreeMap<String, String> {
    if let Some(value) = label(gpus) {
        labels.entry("gpu".to_string()).or_insert(value);
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, memory_mib: u64) -> Gpu {
        Gpu { name: name.into(), memory_mib }
    }

    #[test]
    fn nvidia_smi_lines_read_as_gpus_and_describe_them() {
        let cases: [(&str, Vec<Gpu>, Option<&str>, Option<&str>); 5] = [
            ("", vec![], None, None),
            (
                "NVIDIA H200, 143771\n",
                vec![gpu("NVIDIA H200", 143771)],
                Some("NVIDIA H200 (143771 MiB)"),
                Some("nvidia-h200"),
            ),
            (
                "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n",
                vec![gpu("NVIDIA H100 80GB HBM3", 81559), gpu("NVIDIA H100 80GB HBM3", 81559)],
                Some("2 x NVIDIA H100 80GB HBM3 (81559 MiB)"),
                Some("nvidia-h100-80gb-hbm3"),
            ),
            (
                "Tesla T4, 15360\nNVIDIA A10, 23028\n",
                vec![gpu("Tesla T4", 15360), gpu("NVIDIA A10", 23028)],
                Some("Tesla T4 (15360 MiB), NVIDIA A10 (23028 MiB)"),
                Some("tesla-t4"),
            ),
            ("No devices were found\n, 12\nNVIDIA L4, [N/A]\n", vec![], None, None),
        ];
        for (text, want, described, labelled) in cases {
            let got = parse_query(text);
            assert_eq!(got, want, "{text:?}");
            assert_eq!(describe(&got).as_deref(), described, "{text:?}");
            assert_eq!(label(&got).as_deref(), labelled, "{text:?}");
        }
    }

    #[test]
    fn memory_queries_read_free_total_and_this_process_use() {
        let cases: [(&str, Option<(u64, u64)>); 4] = [
            ("140000, 143771\n", Some((140000, 143771))),
            ("80000, 81559\n1000, 81559\n", Some((80000, 81559))),
            ("[N/A], [N/A]\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            let got = parse_memory(text).map(|m| (m.free_mib, m.total_mib));
            assert_eq!(got, want, "{text:?}");
        }
        let apps = "4242, 1830\n17, 900\n4242, 170\nbad line\n99, [N/A]\n";
        // (pid, MiB): summed over GPUs; a process that is not listed holds none.
        for (pid, want) in [(4242, 2000), (17, 900), (99, 0), (5, 0)] {
            assert_eq!(parse_process_memory(apps, pid), want, "pid {pid}");
        }
    }

    #[test]
    fn the_gpu_label_is_added_unless_the_config_set_one() {
        let h200 = [gpu("NVIDIA H200", 143771)];
        let configured: BTreeMap<String, String> = [("gpu".to_string(), "big".to_string())].into();
        assert_eq!(with_gpu_label(configured.clone(), &h200), configured);
        assert_eq!(with_gpu_label(BTreeMap::new(), &h200).get("gpu").map(String::as_str), Some("nvidia-h200"));
        assert!(with_gpu_label(BTreeMap::new(), &[]).is_empty());
    }
}
