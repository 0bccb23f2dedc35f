//! A real etcd cluster on loopback (Debian's `etcd-server`, which `scripts/setup.sh` installs): each
//! member with its own data folder and ports, stopped (SIGKILL) and started again one at a time, so
//! tests can take a member or the quorum away.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::temp_dir;
use crate::wait::wait_for;

/// One member: its name, ports, data folder and process (when running).
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of real `etcd` processes on 127.0.0.1, killed when dropped.
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    token: String,
    dir: PathBuf,
}

/// A TCP port free now on 127.0.0.1 (etcd must be told its ports; a port taken between this and
/// etcd's bind makes the member fail to start, which the health wait reports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl EtcdCluster {
    /// Starts `n` members and waits until each answers healthy; `None` (the test skips, saying why)
    /// where etcd is not installed and `FABRIC_REQUIRE_TOOLS` is unset.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        let binary = crate::tools::tool(&["etcd"])?;
        let dir = temp_dir("etcd");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let token = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "fabric".into());
        let mut cluster = EtcdCluster { binary, members, token, dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i);
        }
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let fresh = !m.data.exists();
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).expect("etcd log file");
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", if fresh { "new" } else { "existing" }])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.members[i].child = Some(child);
    }

    /// The client endpoints, `127.0.0.1:PORT` each.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("127.0.0.1:{}", m.client)).collect()
    }

    /// The registry's `--store` argument for this cluster.
    pub fn store_arg(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Whether member `i` says it is healthy (it has a leader and answers).
    pub fn healthy(&self, i: usize) -> bool {
        let url = format!("http://127.0.0.1:{}/health", self.members[i].client);
        let agent = crate::http::client();
        match agent.get(&url).call() {
            Ok(mut r) => r.body_mut().read_to_string().is_ok_and(|b| b.contains("\"true\"")),
            Err(_) => false,
        }
    }

    /// Waits (60 s at most) until member `i` is healthy.
    pub fn wait_healthy(&self, i: usize) {
        let log = self.dir.join(format!("{}.log", self.members[i].name));
        let within = Duration::from_secs(60);
        let limit = std::time::Instant::now() + within;
        while !self.healthy(i) {
            if std::time::Instant::now() > limit {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                panic!("etcd member {i} not healthy within {within:?}; its log (last lines, newest first):\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data folder and ports (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Waits until every running member is healthy (quorum back).
    pub fn wait_all_healthy(&self) {
        let running: Vec<usize> = (0..self.members.len()).filter(|i| self.members[*i].child.is_some()).collect();
        wait_for("etcd healthy again", Duration::from_secs(60), || running.iter().all(|i| self.healthy(*i)));
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
