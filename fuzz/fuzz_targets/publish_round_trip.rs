//! PUBLISH encode -> decode round trip.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wharf_mqtt::fuzzing::publish_round_trip(data);
});
