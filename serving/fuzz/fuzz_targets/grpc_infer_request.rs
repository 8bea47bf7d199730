//! A gRPC `ModelInferRequest` from arbitrary protobuf bytes (what tonic decodes off the wire),
//! then the server's own decoding into a request: raw contents against declared shapes and
//! types, typed contents, parameters. Every input gives a request or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee_proto::inference::ModelInferRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ModelInferRequest::decode(data) {
        let _ = marquee_serving::grpc::decode_infer(request);
    }
});
