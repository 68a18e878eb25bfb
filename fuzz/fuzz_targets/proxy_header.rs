//! Raw bytes into the PROXY protocol header parsers (v1 line, v2 fixed part and body).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = wharf_proxy::parse_v1(data);
    if let Some((fixed, body)) = data.split_first_chunk::<16>() {
        let _ = wharf_proxy::v2_body_len(fixed);
        let _ = wharf_proxy::parse_v2(fixed, body);
    }
});
