//! `config.pbtxt` as an operator writes it (protobuf text format), then everything the server
//! derives from it at load: the platform, the version policy, the instances and the completed
//! spec against a graph (ONNX) or the declared signature (TorchScript). Every file gives a spec
//! or a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee_serving::backend::GraphTensor;
use marquee_serving::model::spec::{self, ModelDefaults};
use marquee_serving::tensor::DataType;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = marquee_proto::parse_config_text(text) else {
        return;
    };
    let defaults = ModelDefaults {
        max_batch_size: 8,
        max_queue_size: 64,
        intra_op_threads: 1,
    };
    let _ = spec::select_versions(&config, &[1, 2, 3]);
    let _ = spec::model_filename(&config);
    let _ = spec::session_configs("m", &config, &defaults);
    let graph = (
        vec![GraphTensor {
            name: "X".into(),
            dtype: Some(DataType::Fp32),
            shape: vec![-1, 10],
        }],
        vec![GraphTensor {
            name: "Y".into(),
            dtype: Some(DataType::Fp32),
            shape: vec![-1, 1],
        }],
    );
    let _ = spec::build_spec("m", 1, config.clone(), &graph.0, &graph.1, &defaults);
    if let Ok((inputs, outputs)) = spec::declared_signature(&config) {
        let _ = spec::build_spec("m", 1, config, &inputs, &outputs, &defaults);
    }
});
