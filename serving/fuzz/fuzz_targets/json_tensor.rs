//! JSON tensor data (`"data"` of a v2 input: flat or nested lists, strings for BYTES, booleans)
//! against a datatype and a shape taken from the input's first bytes. Decoding must give a tensor
//! whose element count matches its shape, or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee_serving::tensor::{DataType, Tensor, element_count};

const TYPES: [&str; 15] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "BF16", "FP32", "FP64", "BYTES", "FP8",
];

fuzz_target!(|data: &[u8]| {
    let [kind, rank, rest @ ..] = data else {
        return;
    };
    let rank = usize::from(rank % 4);
    if rest.len() < rank {
        return;
    }
    let (dims, json) = rest.split_at(rank);
    // Dimensions from -2 to 13: negative and zero ones included, as clients may send them.
    let shape: Vec<i64> = dims.iter().map(|&d| i64::from(d % 16) - 2).collect();
    let Some(dtype) = DataType::from_name(TYPES[usize::from(*kind) % TYPES.len()]) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    if let Ok(tensor) = Tensor::from_json("x", dtype, shape.clone(), &value) {
        assert_eq!(Some(tensor.len()), element_count(&shape), "{shape:?}");
        let _ = tensor.to_json_values();
    }
});
