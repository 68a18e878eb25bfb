//! Raw bytes into the edge<->worker frame decoder, both directions.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wharf_shared::codec::fuzzing::decode_frames(data);
});
