//! MQTT over WebSocket and secure WebSocket, and the PROXY protocol in front of a listener:
//! byte-level checks with tungstenite, and independent clients (paho-mqtt's WebSocket
//! transport, mosquitto_pub over TCP) against the real processes.

use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::QoS;
use std::net::SocketAddr;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use wharf_edge::config::{ListenerKind, ProxyListeners};
use wharf_edge::tls::{ClientCerts, TlsSettings};
use wharf_edge::{Edge, EdgeConfig};
use wharf_tests::certs::Pki;
use wharf_tests::client::{payloads, Client};
use wharf_tests::mock_worker::MockWorker;
use wharf_tests::process::{free_port, BrokerHost};
use wharf_tests::raw::{connect_bytes, publish_bytes, subscribe_bytes, Raw};
use wharf_tests::{edge_config, init_tracing, start_edge, PATIENCE};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(addr: SocketAddr, path: &str) -> Result<Ws, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("mqtt"),
    );
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(
        response.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
        Some(&HeaderValue::from_static("mqtt")),
        "the server names the subprotocol it chose"
    );
    Ok(ws)
}

/// The next MQTT packets from the WebSocket, read from binary messages until `n` have come.
async fn ws_packets(ws: &mut Ws, n: usize) -> Vec<Packet> {
    let mut buf = bytes::BytesMut::new();
    let mut packets = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while packets.len() < n {
            while let Ok(p) = Packet::read(&mut buf, 1 << 20) {
                packets.push(p);
            }
            if packets.len() >= n {
                break;
            }
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => buf.extend_from_slice(&data),
                Some(Ok(Message::Text(_))) => panic!("the broker sent a text message"),
                Some(Ok(_)) => {}
                other => panic!("WebSocket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("packets in time");
    packets
}

/// A WebSocket connection on `/mqtt` with its CONNECT accepted.
async fn ws_session(addr: SocketAddr, client_id: &str) -> Ws {
    let mut ws = ws_connect(addr, "/mqtt").await.expect("upgrade");
    ws.send(Message::binary(connect_bytes(client_id, true, 60)))
        .await
        .expect("send");
    assert!(matches!(
        ws_packets(&mut ws, 1).await[..],
        [Packet::ConnAck(_)]
    ));
    ws
}

/// Whether the broker closes the WebSocket (a close frame or the end of the stream).
async fn ws_closed(ws: &mut Ws) -> bool {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// An edge with a WebSocket listener (and `configure`'s changes) on a mock worker.
async fn mock_edge(configure: impl FnOnce(&mut EdgeConfig)) -> (TempDir, MockWorker, Edge) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let socket = dir.path().join("worker.sock");
    let worker = MockWorker::start(&socket);
    let mut config = edge_config(&socket, "edge-web");
    config.web.ws = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    configure(&mut config);
    (dir, worker, start_edge(config).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_may_span_websocket_messages_and_share_one() {
    let (_dir, _worker, edge) = mock_edge(|_| {}).await;
    let addr = edge.ws_addr.expect("WebSocket listener");

    let mut ws = ws_connect(addr, "/mqtt").await.expect("upgrade");
    // CONNECT split over three messages.
    let connect = connect_bytes("ws-1", true, 60);
    for part in [&connect[..1], &connect[1..5], &connect[5..]] {
        ws.send(Message::binary(part.to_vec())).await.expect("send");
    }
    assert!(matches!(
        ws_packets(&mut ws, 1).await[..],
        [Packet::ConnAck(_)]
    ));
    // SUBSCRIBE and a PUBLISH to it in one message: SUBACK, then the message back.
    let both = [
        subscribe_bytes(1, &[("ws/#", 0)]),
        publish_bytes("ws/a", 0, 0, false, b"one message, two packets"),
    ]
    .concat();
    ws.send(Message::binary(both)).await.expect("send");
    // (The PUBLISH may come before the SUBACK: MQTT-3.8.4 allows it.)
    let packets = ws_packets(&mut ws, 2).await;
    assert!(
        packets.iter().any(|p| matches!(p, Packet::SubAck(_))),
        "{packets:?}"
    );
    let echoed = packets.iter().find_map(|p| match p {
        Packet::Publish(p) => Some(p.payload.to_vec()),
        _ => None,
    });
    assert_eq!(echoed.as_deref(), Some(&b"one message, two packets"[..]));
    // A TCP client and the WebSocket client see each other's messages.
    let mut tcp = Client::connect(edge.local_addr, "tcp-1", true).await;
    tcp.subscribe("ws/#", QoS::AtLeastOnce).await;
    ws.send(Message::binary(publish_bytes(
        "ws/b", 1, 7, false, b"from-ws",
    )))
    .await
    .expect("send");
    assert!(matches!(
        ws_packets(&mut ws, 2).await[..],
        [Packet::Publish(_), Packet::PubAck(_)] | [Packet::PubAck(_), Packet::Publish(_)]
    ));
    assert_eq!(payloads(&tcp.publishes(1).await), vec!["from-ws"]);

    // A text message closes the connection.
    ws.send(Message::text("PINGREQ")).await.expect("send");
    assert!(
        ws_closed(&mut ws).await,
        "a text message must close the connection"
    );

    // Other paths and subprotocols are refused at the upgrade.
    assert!(ws_connect(addr, "/other").await.is_err());
    let stream = TcpStream::connect(addr).await.expect("tcp");
    let mut request = format!("ws://{addr}/mqtt")
        .into_client_request()
        .expect("req");
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("wamp"),
    );
    assert!(tokio_tungstenite::client_async(request, stream)
        .await
        .is_err());
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_over_the_size_limit_closes_the_websocket() {
    let (_dir, _worker, edge) = mock_edge(|c| c.limits.max_packet_size = 1024).await;
    let mut ws = ws_session(edge.ws_addr.expect("ws"), "ws-big").await;
    let _ = ws
        .send(Message::binary(publish_bytes(
            "big",
            0,
            0,
            false,
            &[7u8; 4096],
        )))
        .await;
    assert!(
        ws_closed(&mut ws).await,
        "a message past the limit must close"
    );
    edge.stop().await;
}

/// paho-mqtt subscribes over WebSocket in 3.1.1 and in 5.0 and gets, by payload, every
/// message mosquitto_pub sends over TCP; what paho publishes over WebSocket reaches a TCP
/// subscriber. Real edge and store-worker processes, embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_websocket_with_mosquitto_over_tcp() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let ws_port = free_port();
    let ws_listen = format!("127.0.0.1:{ws_port}");
    let host =
        BrokerHost::start_with_args(dir.path(), "h1", None, &[], &["--ws-listen", &ws_listen])
            .await;
    let tcp_port = host.addr.port();
    let mut tcp = Client::connect(host.addr, "tcp-sub", true).await;
    tcp.subscribe("back/#", QoS::AtLeastOnce).await;
    let script = format!(
        r#"
import subprocess, sys, threading, time
import paho.mqtt.client as mqtt

got = {{"v311": [], "v5": []}}
ready = threading.Event()
subscribed = []

def client(name, protocol):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws-" + name,
                    protocol=protocol, transport="websockets")
    c.ws_set_options(path="/mqtt")
    def on_connect(c, u, flags, rc, p):
        c.subscribe("web/#", qos=1)
    def on_subscribe(c, u, mid, codes, p):
        subscribed.append(name)
    def on_message(c, u, m):
        got[name].append(m.payload.decode())
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect("127.0.0.1", {ws_port}, keepalive=30)
    c.loop_start()
    return c

clients = [client("v311", mqtt.MQTTv311), client("v5", mqtt.MQTTv5)]
for _ in range(100):
    if len(subscribed) == 2:
        break
    time.sleep(0.1)
assert len(subscribed) == 2, "SUBACKs over WebSocket"
sent = ["m-%d" % i for i in range(20)]
for m in sent:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", "{tcp_port}", "-q", "1",
                    "-t", "web/t", "-m", m], check=True)
for _ in range(100):
    if all(len(v) >= len(sent) for v in got.values()):
        break
    time.sleep(0.1)
time.sleep(0.3)
for name, payloads in got.items():
    assert payloads == sent, (name, payloads)
info = clients[1].publish("back/from-ws", b"paho-ws", qos=1)
info.wait_for_publish(10)
for c in clients:
    c.disconnect(); c.loop_stop()
print("ok")
"#
    );
    wharf_tests::mongo::run_python(&script).await;
    assert_eq!(payloads(&tcp.publishes(1).await), vec!["paho-ws"]);
}

/// Secure WebSocket without the MQTT TLS listener: paho verifies the server certificate
/// against the test CA and gets its own message back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_secure_websocket() {
    let pki = Pki::new();
    let (ca_path, server) = (&pki.ca_path, &pki.server);
    let (_dir, _worker, edge) = mock_edge(|c| {
        c.web.ws = None;
        c.tls = Some(TlsSettings {
            listen: None,
            cert: server.cert.clone(),
            key: server.key.clone(),
            ca: None,
            client_certs: ClientCerts::Off,
            cert_identity: false,
        });
        c.web.wss = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    assert!(
        edge.tls_addr.is_none(),
        "no MQTT TLS listener was asked for"
    );
    let port = edge.wss_addr.expect("wss").port();
    let ca_path = ca_path.display();
    let script = format!(
        r#"
import threading, time
import paho.mqtt.client as mqtt
got, ready = [], threading.Event()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-wss", transport="websockets")
c.tls_set(ca_certs="{ca_path}")
c.on_connect = lambda c, u, f, rc, p: c.subscribe("secure/#", qos=1)
c.on_subscribe = lambda c, u, mid, codes, p: ready.set()
c.on_message = lambda c, u, m: got.append(m.payload)
c.connect("localhost", {port})
c.loop_start()
assert ready.wait(10), "SUBACK over wss"
c.publish("secure/x", b"over-wss", qos=1).wait_for_publish(10)
for _ in range(100):
    if got:
        break
    time.sleep(0.1)
assert got == [b"over-wss"], got
c.disconnect(); c.loop_stop()
print("ok")
"#
    );
    wharf_tests::mongo::run_python(&script).await;
    edge.stop().await;
}

fn proxy_v2(source: SocketAddr) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    let SocketAddr::V4(v4) = source else {
        panic!("IPv4 only here")
    };
    header.extend_from_slice(&v4.ip().octets());
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&v4.port().to_be_bytes());
    header.extend_from_slice(&1883u16.to_be_bytes());
    header
}

/// A listener that requires the PROXY protocol serves connections with a v1 or v2 header and
/// closes those without one or with a malformed one; the plain WebSocket listener beside it
/// does not require it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_are_required_where_configured() {
    let (_dir, _worker, edge) =
        mock_edge(|c| c.proxy = ProxyListeners::default().with(ListenerKind::Mqtt)).await;
    let addr = edge.local_addr;

    let headers: [(&str, Vec<u8>); 3] = [
        (
            "v1",
            b"PROXY TCP4 203.0.113.5 127.0.0.1 40001 1883\r\n".to_vec(),
        ),
        ("v2", proxy_v2("198.51.100.7:40002".parse().expect("addr"))),
        ("v1 unknown", b"PROXY UNKNOWN\r\n".to_vec()),
    ];
    for (name, header) in headers {
        let mut raw = Raw::connect(addr).await;
        // Header and CONNECT in one write, as a proxy forwarding a fast client would.
        raw.send(
            &[
                header,
                connect_bytes(&format!("px-{}", name.len()), true, 60),
            ]
            .concat(),
        )
        .await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(_))),
            "{name}: CONNACK expected"
        );
    }
    // No header: a CONNECT straight away is refused.
    let mut raw = Raw::connect(addr).await;
    raw.send(&connect_bytes("px-none", true, 60)).await;
    assert!(
        raw.recv().await.is_none(),
        "a connection without the header must be closed"
    );
    for bad in [
        &b"PROXY TCP4 203.0.113.5 127.0.0.1 notaport 1883\r\n"[..],
        b"PROXY TCP9 a b c d\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x02\x00\x00",
    ] {
        let mut stream = TcpStream::connect(addr).await.expect("tcp");
        let _ = stream
            .write_all(&[bad, &connect_bytes("px-bad", true, 60)].concat())
            .await;
        let mut raw = Raw::from_stream(stream);
        assert!(
            raw.recv().await.is_none(),
            "{:?} must be refused",
            String::from_utf8_lossy(bad)
        );
    }
    // The WebSocket listener does not require a header.
    ws_session(edge.ws_addr.expect("ws"), "ws-np").await;
    edge.stop().await;
}

/// Plain HTTP on the WebSocket port gets an HTTP error (RFC 6455 4.2.2), not a silent close:
/// 400 for what is no upgrade, 404 for another path, 426 naming version 13 for another
/// WebSocket version. A real upgrade still works after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_websocket_port_gets_an_http_error() {
    use tokio::io::AsyncReadExt;
    let (_dir, _worker, edge) = mock_edge(|_| {}).await;
    let addr = edge.ws_addr.expect("ws");
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        ("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 400),
        (
            "POST /mqtt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_owned(),
            400,
        ),
        (
            format!("GET /mqtt HTTP/1.0\r\nHost: x\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n"),
            400,
        ),
        (
            "GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
            404,
        ),
        (
            format!("GET /mqtt HTTP/1.1\r\nHost: x\r\n{upgrade}Sec-WebSocket-Version: 8\r\n\r\n"),
            426,
        ),
    ];
    for (request, status) in cases {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
            .await
            .expect("answered and closed")
            .expect("read");
        let first = response.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {response:?}"
        );
        if status == 426 {
            assert!(
                response.contains("Sec-WebSocket-Version: 13"),
                "{response:?}"
            );
        }
    }
    // ws_session asserts the CONNACK.
    let _ws = ws_session(addr, "after-http").await;
}
