//! Raw bytes into the client's half of the MQTT decoder (what a remote broker sends a bridge).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wharf_mqtt::fuzzing::decode_server_bytes(data);
});
