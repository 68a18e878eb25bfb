//! Raw bytes into the MQTT 3.1.1 decoder as the edge uses it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wharf_mqtt::fuzzing::decode_bytes(data);
});
