//! A SecantusDB server (MongoDB wire protocol on WiredTiger) started for a test from the
//! project's Python venv (`scripts/install-deps.sh` makes it), on a free loopback port with a
//! temp storage directory. Stopped when dropped.

use crate::PATIENCE;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Secantus {
    pub port: u16,
    storage: PathBuf,
    child: Option<Child>,
}

pub fn venv() -> PathBuf {
    std::env::var_os("WHARF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

/// Runs a Python script (paho-mqtt and the rest of the venv) that prints "ok" when its checks
/// pass; fails the test with its output otherwise, or after a minute.
pub async fn run_python(script: &str) {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(venv().join("bin/python"))
            .args(["-c", script])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python script finished in time")
    .expect("run python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    crate::process::free_port()
}

impl Secantus {
    /// Starts a server with its storage under `dir`.
    pub async fn start(dir: &Path) -> Secantus {
        let mut server = Secantus {
            port: free_port(),
            storage: dir.join("secantus"),
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Kills the server process (as a crash would).
    /// SIGSTOP: the server stops answering, as a stalled database would; its sockets stay open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: the frozen server runs on.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        std::fs::create_dir_all(&self.storage).expect("storage dir");
        let bin = venv().join("bin/secantusd-py");
        assert!(
            bin.exists(),
            "{} missing: run scripts/install-deps.sh",
            bin.display()
        );
        let child = Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--storage-path",
            ])
            .arg(&self.storage)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start secantusd-py");
        self.child = Some(child);
        let ready = tokio::time::timeout(PATIENCE * 3, async {
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "SecantusDB did not open port {}", self.port);
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        self.kill();
    }
}
