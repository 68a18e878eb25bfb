//! Wharf's real binaries as child processes, for tests that kill them (`SIGKILL`) or run
//! several brokers at once. `scripts/test.sh` builds the binaries before the tests; their
//! directory can be overridden with `WHARF_BIN_DIR`.

use crate::PATIENCE;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WHARF_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One broker host: a store-worker and an edge, each a process.
pub struct BrokerHost {
    pub name: String,
    pub addr: SocketAddr,
    dir: PathBuf,
    mongodb_uri: Option<String>,
    worker_args: Vec<String>,
    worker: Option<Child>,
    edge: Option<Child>,
}

impl BrokerHost {
    /// Starts worker and edge for host `name`, with files under `dir/name`; with
    /// `mongodb_uri` the worker uses MongoDB, else the embedded store.
    pub async fn start(dir: &Path, name: &str, mongodb_uri: Option<String>) -> BrokerHost {
        Self::start_with(dir, name, mongodb_uri, &[]).await
    }

    /// Like `start`, with extra store-worker flags.
    pub async fn start_with(
        dir: &Path,
        name: &str,
        mongodb_uri: Option<String>,
        worker_args: &[&str],
    ) -> BrokerHost {
        let mut host = BrokerHost {
            name: name.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: dir.join(name),
            mongodb_uri,
            worker_args: worker_args.iter().map(|a| a.to_string()).collect(),
            worker: None,
            edge: None,
        };
        std::fs::create_dir_all(&host.dir).expect("host dir");
        host.start_worker().await;
        host.start_edge().await;
        host
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("worker.sock")
    }

    fn log(&self, what: &str) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{what}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    pub async fn start_worker(&mut self) {
        let mut cmd = Command::new(bin("store-worker"));
        cmd.arg("--socket")
            .arg(self.socket())
            .args(["--host", &self.name, "--retry-limit", "30", "--data-dir"])
            .arg(self.dir.join("data"))
            .env("RUST_LOG", "info")
            .stdout(self.log("worker"))
            .stderr(self.log("worker"));
        if let Some(uri) = &self.mongodb_uri {
            cmd.args(["--mongodb-uri", uri]);
        }
        cmd.args(&self.worker_args);
        self.worker = Some(cmd.spawn().expect("start store-worker"));
        let socket = self.socket();
        wait_until("worker socket", || async {
            tokio::net::UnixStream::connect(&socket).await.is_ok()
        })
        .await;
    }

    pub async fn start_edge(&mut self) {
        let child = Command::new(bin("edge"))
            .args([
                "--listen",
                &self.addr.to_string(),
                "--host",
                &self.name,
                "--worker-socket",
            ])
            .arg(self.socket())
            .env("RUST_LOG", "info")
            .stdout(self.log("edge"))
            .stderr(self.log("edge"))
            .spawn()
            .expect("start edge");
        self.edge = Some(child);
        let addr = self.addr;
        wait_until("edge port", || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
    }

    /// SIGKILL, as a crash or a power cut of the process would.
    pub fn kill_edge(&mut self) {
        kill(self.edge.take());
    }

    pub fn kill_worker(&mut self) {
        kill(self.worker.take());
    }

    pub fn kill(&mut self) {
        self.kill_edge();
        self.kill_worker();
    }
}

fn kill(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for BrokerHost {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_until<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = tokio::time::timeout(PATIENCE * 3, async {
        while !ready().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what} not ready in time");
}
