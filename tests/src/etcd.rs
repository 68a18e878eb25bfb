//! An etcd server for a test: Debian's `etcd` on free loopback ports with a temp data dir,
//! stopped when dropped.

use crate::process::free_port;
use crate::PATIENCE;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Etcd {
    pub port: u16,
    child: Child,
}

impl Etcd {
    pub async fn start(dir: &Path) -> Etcd {
        let (port, peer) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "wharf-test", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("wharf-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian package etcd-server; see scripts/install-deps.sh)");
        let etcd = Etcd { port, child };
        let ready = tokio::time::timeout(PATIENCE * 3, async {
            loop {
                if let Ok(mut c) = etcd_client::Client::connect([etcd.url()], None).await {
                    if c.get("probe", None).await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "etcd did not start on port {port}");
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets `prefix/key` for each pair.
    pub async fn put(&self, prefix: &str, pairs: &[(&str, &str)]) {
        let mut client = etcd_client::Client::connect([self.url()], None)
            .await
            .expect("etcd client");
        for (key, value) in pairs {
            client
                .put(format!("{prefix}/{key}"), *value, None)
                .await
                .expect("put");
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
