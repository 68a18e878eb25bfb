//! Debian's Mosquitto as a child process: the remote of bridge tests, and a bridge itself
//! for comparison.

use crate::process::free_port;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Mosquitto {
    pub addr: SocketAddr,
    dir: PathBuf,
    /// Extra lines of mosquitto.conf.
    extra: String,
    persistence: bool,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port with its files under `dir`; `persistence`
    /// keeps its sessions across restarts. Offline sessions queue without limit.
    pub async fn start(dir: &Path, persistence: bool, extra: &str) -> Mosquitto {
        std::fs::create_dir_all(dir).expect("mosquitto dir");

        let mut m = Mosquitto {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: dir.to_owned(),
            extra: extra.to_owned(),
            persistence,
            child: None,
        };
        m.restart().await;
        m
    }

    fn write_config(&self) -> PathBuf {
        let path = self.dir.join("mosquitto.conf");
        let mut conf = format!(
            // `user root`: started as root, Mosquitto would otherwise run as its own user,
            // which cannot write its persistence file into a private temp directory (it is
            // ignored when not started as root). `max_inflight_messages 0`: with its default
            // of 20, Mosquitto 2.0.11 delivered 1 to 67 of 300 queued QoS 1 messages of one
            // publisher out of order to a client that acknowledges slower than it publishes
            // (the bridge, whose acknowledgement waits for Wharf's durable write).
            "listener {} 127.0.0.1\nuser root\nmax_queued_messages 0\nmax_inflight_messages 0\n",
            self.addr.port()
        );
        if !self.extra.contains("allow_anonymous") && !self.extra.contains("password_file") {
            conf.push_str("allow_anonymous true\n");
        }
        if self.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.display()
            ));
        }
        conf.push_str(&self.extra);
        std::fs::write(&path, conf).expect("mosquitto.conf");
        path
    }

    /// (Re)starts it on the same port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "mosquitto is running");
        let conf = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package) must be installed");
        self.child = Some(child);
        let addr = self.addr;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mosquitto did not listen on {addr} (see its log)");
    }

    /// SIGKILL, as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (Mosquitto writes its persistence file), and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
