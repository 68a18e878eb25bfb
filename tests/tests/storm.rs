//! A fleet that comes back at once: persistent devices, each subscribed to its own command
//! topic, go away; messages are published to each (among traffic nobody subscribes to); then
//! every device reconnects at the same moment. None is refused, and each gets exactly what it
//! is owed, in order. So do two watchers that come back with them: one on a topic prefix
//! (`dev/#`, read through the topic index) and one on a filter that starts with a wildcard
//! (`+/+/cmd`, read by time). Checked by message identity on both backends.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_tests::raw::{self, Raw};
use wharf_tests::stack::{Kind, Stack};
use wharf_tests::PATIENCE;

struct Size {
    devices: u32,
    owed: u32,
    unrelated: u32,
}

/// The Python MongoDB-wire server of the tests takes about 18k documents a second.
fn size(kind: Kind) -> Size {
    match kind {
        Kind::Embedded => Size {
            devices: 1_000,
            owed: 5,
            unrelated: 20_000,
        },
        Kind::Mongo => Size {
            devices: 300,
            owed: 5,
            unrelated: 3_000,
        },
    }
}

fn device(i: u32) -> String {
    format!("dev-{i}")
}

fn command_topic(i: u32) -> String {
    format!("dev/{}/cmd", device(i))
}

/// Opens a persistent session with these subscriptions (QoS 1) and leaves it cleanly.
async fn subscribe_and_leave(addr: SocketAddr, client_id: &str, filters: &[&str]) {
    let mut raw = Raw::session(addr, client_id, false).await;
    let filters: Vec<(&str, u8)> = filters.iter().map(|f| (*f, 1)).collect();
    raw.send(&raw::subscribe_bytes(1, &filters)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    raw.send(&[0xe0, 0]).await;
    raw.expect_closed().await;
}

/// Publishes each (topic, payload) at QoS 1 on one connection, pipelined, and waits until
/// every one is acknowledged.
async fn publish_acked(addr: SocketAddr, client_id: &str, messages: Vec<(String, String)>) {
    let raw = Raw::session(addr, client_id, true).await;
    let (stream, mut buf) = raw.into_parts();
    let (mut rx, mut tx) = stream.into_split();
    let total = messages.len();
    let reader = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(_)) => acked += 1,
                Ok(other) => panic!("publisher got {other:?}"),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {
                    let read = tokio::time::timeout(PATIENCE, rx.read_buf(&mut buf)).await;
                    assert!(
                        matches!(read, Ok(Ok(n)) if n > 0),
                        "publisher: {acked} of {total} acknowledged"
                    );
                }
                Err(e) => panic!("publisher: {e:?}"),
            }
        }
    });
    let mut out = Vec::new();
    for (n, (topic, payload)) in messages.iter().enumerate() {
        let pkid = (n % 60_000) as u16 + 1;
        out.extend(raw::publish_bytes(
            topic,
            1,
            pkid,
            false,
            payload.as_bytes(),
        ));
        if out.len() > 64 * 1024 {
            tx.write_all(&out).await.expect("publish");
            out.clear();
        }
    }
    tx.write_all(&out).await.expect("publish");
    reader.await.expect("every publish acknowledged");
}

/// Reconnects a persistent session and reads (acknowledging) until `expected` messages came
/// or nothing more comes; returns the payloads in arrival order, or why it was refused.
async fn come_back(
    addr: SocketAddr,
    client_id: String,
    expected: usize,
) -> Result<Vec<String>, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(&raw::connect_bytes(&client_id, false, 60))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut connacked = false;
    while got.len() < expected || !connacked {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(a)) => {
                if a.code != mqttbytes::v4::ConnectReturnCode::Success || !a.session_present {
                    return Err(format!("{client_id}: CONNACK {a:?}"));
                }
                connacked = true;
            }
            Ok(Packet::Publish(p)) => {
                if p.qos != rumqttc::QoS::AtMostOnce {
                    let mut ack = BytesMut::new();
                    mqttbytes::v4::PubAck::new(p.pkid)
                        .write(&mut ack)
                        .expect("encode");
                    stream.write_all(&ack).await.map_err(|e| e.to_string())?;
                }
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(other) => return Err(format!("{client_id}: unexpected {other:?}")),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {
                // Bounds a hang; the storm itself takes seconds.
                match tokio::time::timeout(PATIENCE * 6, stream.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Ok(got),
                }
            }
            Err(e) => return Err(format!("{client_id}: {e:?}")),
        }
    }
    Ok(got)
}

/// Whether `got` holds each of `want` exactly in its order, allowing duplicates (QoS 1) only
/// as repeats of what came before; `None` when it does, else what is wrong.
fn mismatch(who: &str, got: &[String], want: &[String]) -> Option<String> {
    let mut first = Vec::new();
    for payload in got {
        if !first.contains(payload) {
            first.push(payload.clone());
        }
    }
    (first != want).then(|| {
        format!(
            "{who}: got {} ({} distinct), wanted {}; first got {:?}, first wanted {:?}",
            got.len(),
            first.len(),
            want.len(),
            &first[..first.len().min(3)],
            &want[..want.len().min(3)]
        )
    })
}

async fn a_returning_fleet_gets_what_it_is_owed(kind: Kind) {
    let Size {
        devices,
        owed,
        unrelated,
    } = size(kind);
    let stack = Stack::new(kind).await;
    let addr = stack.addr();

    // The sessions, opened a few hundred at a time.
    let ids: Vec<u32> = (0..devices).collect();
    for chunk in ids.chunks(200) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| {
                tokio::spawn(async move {
                    subscribe_and_leave(addr, &device(i), &[&command_topic(i)]).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("session opened");
        }
    }
    subscribe_and_leave(addr, "watch-prefix", &["dev/#"]).await;
    subscribe_and_leave(addr, "watch-wildcard", &["+/+/cmd"]).await;

    // Traffic no session subscribes to, then what each device is owed, interleaved.
    let noise = (0..unrelated)
        .map(|n| (format!("telemetry/{}/temp", n % 997), format!("noise:{n}")))
        .collect();
    publish_acked(addr, "noise", noise).await;
    let mut owed_messages = Vec::new();
    for seq in 0..owed {
        for i in 0..devices {
            owed_messages.push((command_topic(i), format!("{}:{seq}", device(i))));
        }
    }
    let everything: Vec<String> = owed_messages.iter().map(|(_, p)| p.clone()).collect();
    publish_acked(addr, "commander", owed_messages).await;

    // Everyone at once.
    let mut tasks = Vec::new();
    for i in 0..devices {
        tasks.push((
            device(i),
            tokio::spawn(come_back(addr, device(i), owed as usize)),
        ));
    }
    for watcher in ["watch-prefix", "watch-wildcard"] {
        tasks.push((
            watcher.to_owned(),
            tokio::spawn(come_back(addr, watcher.to_owned(), everything.len())),
        ));
    }
    let mut results = HashMap::new();
    for (who, task) in tasks {
        results.insert(who, task.await.expect("device task"));
    }

    let mut failures = Vec::new();
    for i in 0..devices {
        let want: Vec<String> = (0..owed)
            .map(|seq| format!("{}:{seq}", device(i)))
            .collect();
        match &results[&device(i)] {
            Ok(got) => failures.extend(mismatch(&device(i), got, &want)),
            Err(why) => failures.push(why.clone()),
        }
    }
    for watcher in ["watch-prefix", "watch-wildcard"] {
        match &results[watcher] {
            Ok(got) => failures.extend(mismatch(watcher, got, &everything)),
            Err(why) => failures.push(why.clone()),
        }
    }
    stack.stop().await;
    assert!(
        failures.is_empty(),
        "{kind:?}: {} of {} sessions wrong:\n{}",
        failures.len(),
        devices + 2,
        failures[..failures.len().min(20)].join("\n")
    );
}

mod a_returning_fleet_gets_what_it_is_owed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        super::a_returning_fleet_gets_what_it_is_owed(super::Kind::Embedded).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongodb() {
        super::a_returning_fleet_gets_what_it_is_owed(super::Kind::Mongo).await
    }
}
