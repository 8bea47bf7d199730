//! The REST infer body as a client sends it: JSON, or a JSON header of the length the
//! `Inference-Header-Content-Length` header gives followed by binary tensors (the binary tensor
//! extension). Decoding must answer every input with a request or an error, never a panic.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the header: absent, or a JSON part of that many bytes (which may
    // exceed the body, as a hostile client's would).
    let (header, body) = match data {
        [0, 0, rest @ ..] => (None, rest),
        [hi, lo, rest @ ..] => (Some(u16::from_be_bytes([*hi, *lo])), rest),
        _ => return,
    };
    let mut headers = HeaderMap::new();
    if let Some(length) = header {
        headers.insert(
            "inference-header-content-length",
            HeaderValue::from(u32::from(length)),
        );
    }
    let _ = marquee_serving::http::decode_infer(&headers, Bytes::copy_from_slice(body));
});
