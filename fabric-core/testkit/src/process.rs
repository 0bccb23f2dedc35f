//! Real processes for tests: a binary of this workspace from the build profile the test runs under,
//! started with its stdout watched for the lines it prints when ready, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest a process may take to print its ready line.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// A child process, killed (SIGKILL) on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What followed the ready line's prefix (usually the address it listens on).
    pub addr: String,
    /// The other watched lines seen before the ready line: (prefix, what followed it).
    pub seen: Vec<(String, String)>,
    /// Every stdout line printed after the ready line.
    pub later: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits ([`READY_WITHIN`] at most) for a stdout line starting with `ready`;
    /// lines starting with one of `also` before it are kept in [`Proc::seen`].
    pub fn spawn(mut cmd: Command, ready: &'static str, also: &[&'static str]) -> Proc {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let watched: Vec<&'static str> = also.to_vec();
        let later = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = later.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut ready_seen = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if ready_seen {
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                } else if let Some(rest) = line.strip_prefix(ready) {
                    ready_seen = true;
                    let _ = tx.send((rest.to_string(), std::mem::take(&mut seen)));
                } else if let Some(prefix) = watched.iter().find(|p| line.starts_with(**p)) {
                    seen.push((prefix.to_string(), line[prefix.len()..].to_string()));
                }
            }
        });
        let (addr, seen) = rx
            .recv_timeout(READY_WITHIN)
            .unwrap_or_else(|_| panic!("{program} printed no '{ready}' line within {READY_WITHIN:?}"));
        Proc { child, addr, seen, later }
    }

    /// How many lines the process printed after its ready line that start with `prefix`.
    pub fn printed(&self, prefix: &str) -> usize {
        self.later.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// What followed `prefix` on a watched line, if the process printed one before it was ready.
    pub fn seen(&self, prefix: &str) -> Option<&str> {
        self.seen.iter().find(|(p, _)| p == prefix).map(|(_, rest)| rest.as_str())
    }

    /// Kills the process now (SIGKILL: no goodbye on the wire) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A binary of a package of this workspace, from the build profile of the running test (built on
/// demand when another package's binary is not there yet), so `cargo test --release` runs release
/// nodes.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    // A test runs as target/<profile>/deps/<test>-<hash>; the binaries sit in target/<profile>.
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_path_buf();
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        build.args(["build", "-p", package, "--bin", name]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().expect("cargo runs").success(), "building {package}'s {name} failed");
    }
    bin
}

/// A fresh folder under the system's temp folder, unique to this call (the process, `tag` and a
/// counter), so tests running at once never share one.
pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("fabric-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}
