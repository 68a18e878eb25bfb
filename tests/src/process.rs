//! Wharf's real binaries as child processes, for tests that kill them (`SIGKILL`) or run
//! several brokers at once. `scripts/test.sh` builds the binaries before the tests; their
//! directory can be overridden with `WHARF_BIN_DIR`.

use crate::PATIENCE;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn bin(name: &str) -> PathBuf {
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

/// A loopback port nobody listens on, never handed out twice in this process: tests in
/// one binary run in parallel, and the kernel may offer a just-released port again.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One broker host: a store-worker and an edge, each a process.
pub struct BrokerHost {
    pub name: String,
    pub addr: SocketAddr,
    /// The ops endpoints (/metrics, /healthz, /readyz) of the edge and the worker.
    pub edge_ops: SocketAddr,
    pub worker_ops: SocketAddr,
    dir: PathBuf,
    mongodb_uri: Option<String>,
    worker_args: Vec<String>,
    edge_args: Vec<String>,
    worker: Option<Child>,
    edge: Option<Child>,
}

impl BrokerHost {
    /// Starts worker and edge for host `name`, with files under `dir/name`; with
    /// `mongodb_uri` the worker uses MongoDB, else the embedded store.
    pub async fn start(dir: &Path, name: &str, mongodb_uri: Option<String>) -> BrokerHost {
        Self::start_with(dir, name, mongodb_uri, &[]).await
    }

    /// Host "h1" on the embedded store, in a new temp directory (removed when the returned
    /// `TempDir` is dropped), with tracing on: how a single-host test starts.
    pub async fn single() -> (tempfile::TempDir, BrokerHost) {
        crate::init_tracing();
        let dir = tempfile::TempDir::new().expect("temp dir");
        let host = BrokerHost::start(dir.path(), "h1", None).await;
        (dir, host)
    }

    /// Like `start`, with extra store-worker flags.
    pub async fn start_with(
        dir: &Path,
        name: &str,
        mongodb_uri: Option<String>,
        worker_args: &[&str],
    ) -> BrokerHost {
        Self::start_with_args(dir, name, mongodb_uri, worker_args, &[]).await
    }

    /// Like `start`, with extra store-worker and edge flags.
    pub async fn start_with_args(
        dir: &Path,
        name: &str,
        mongodb_uri: Option<String>,
        worker_args: &[&str],
        edge_args: &[&str],
    ) -> BrokerHost {
        let mut host = BrokerHost {
            name: name.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            edge_ops: SocketAddr::from(([127, 0, 0, 1], free_port())),
            worker_ops: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: dir.join(name),
            mongodb_uri,
            worker_args: worker_args.iter().map(|a| a.to_string()).collect(),
            edge_args: edge_args.iter().map(|a| a.to_string()).collect(),
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
            .args(["--host", &self.name, "--retry-limit", "30"])
            .args([
                "--metrics-listen",
                &self.worker_ops.to_string(),
                "--data-dir",
            ])
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
            .args(["--listen", &self.addr.to_string(), "--host", &self.name])
            .args([
                "--metrics-listen",
                &self.edge_ops.to_string(),
                "--worker-socket",
            ])
            .arg(self.socket())
            .args(&self.edge_args)
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
        // The ops endpoint is bound after the MQTT listener: tests ask it right away.
        let ops = self.edge_ops;
        wait_until("edge ops endpoint", || async move {
            tokio::net::TcpStream::connect(ops).await.is_ok()
        })
        .await;
        // The ports answer: make sure it is our edge, not a process that took a port first.
        let exited = self.edge.as_mut().and_then(|c| c.try_wait().ok().flatten());
        assert!(
            exited.is_none(),
            "edge {} exited: {exited:?} (see its log)",
            self.name
        );
    }

    pub fn edge_pid(&self) -> Option<u32> {
        self.edge.as_ref().map(Child::id)
    }

    /// Resident memory of the edge process, in KiB.
    pub fn edge_rss_kib(&self) -> u64 {
        let pid = self.edge_pid().unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGSTOP to the edge and the worker: the host freezes (as a stalled VM would), its
    /// sockets stay open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: the frozen host runs on.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        for child in [&self.worker, &self.edge].into_iter().flatten() {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
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

    /// SIGTERM to the edge, then to the worker (as `scripts/run.sh` and systemd do); returns
    /// whether both exited successfully.
    pub async fn terminate(&mut self) -> bool {
        let mut ok = true;
        for child in [self.edge.take(), self.worker.take()].into_iter().flatten() {
            ok &= terminate(child).await;
        }
        ok
    }
}

async fn terminate(mut child: Child) -> bool {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let waited = tokio::task::spawn_blocking(move || child.wait()).await;
    matches!(waited, Ok(Ok(status)) if status.success())
}

/// `GET path` on a local HTTP endpoint: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = http(addr, "GET", path, &[], "").await;
    (response.status, response.body)
}

/// An HTTP response as the tests read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The head, status line included.
    pub head: String,
    pub body: String,
}

/// One request (`Connection: close`) with extra header lines and a body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect ops endpoint");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    HttpResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
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
