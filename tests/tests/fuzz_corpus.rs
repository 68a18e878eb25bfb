//! The fuzz targets' corpora (seed inputs and anything the fuzzer found) replayed as
//! regression tests: each input goes through the same entry point the fuzz target calls.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        count += 1;
    }
    assert!(count > 0, "empty corpus for {target}");
}

#[test]
fn mqtt_decode_corpus() {
    replay("mqtt_decode", wharf_edge::protocol::fuzzing::decode_bytes);
}

#[test]
fn publish_round_trip_corpus() {
    replay(
        "publish_round_trip",
        wharf_edge::protocol::fuzzing::publish_round_trip,
    );
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", wharf_shared::codec::fuzzing::decode_frames);
}

/// The server packets a bridge reads: its own seeds, and every client-packet input too.
#[test]
fn server_decode_corpus() {
    replay(
        "server_decode",
        wharf_edge::protocol::fuzzing::decode_server_bytes,
    );
    replay(
        "mqtt_decode",
        wharf_edge::protocol::fuzzing::decode_server_bytes,
    );
}
