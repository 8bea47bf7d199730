//! A `/v1/predict` pipeline declaration (`pipeline.json`, or a manifest's `pipeline`) checked
//! against a model and feature definitions, as the server does when a version loads. Every
//! declaration gives a pipeline or a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee_feature_store::definitions::Definitions;
use marquee_serving::backend::GraphTensor;
use marquee_serving::model::spec::{self, ModelDefaults};
use marquee_serving::predict::pipeline::Pipeline;
use marquee_serving::tensor::DataType;
use std::sync::OnceLock;

/// The hosted models' feature definitions, as the quick start serves them.
const FEATURES: &str = include_str!("../../../deploy/features.toml");

fn context() -> &'static (spec::ModelSpec, Definitions) {
    static CONTEXT: OnceLock<(spec::ModelSpec, Definitions)> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let defaults = ModelDefaults {
            max_batch_size: 64,
            max_queue_size: 64,
            intra_op_threads: 1,
        };
        let tensor = |name: &str, width| GraphTensor {
            name: name.into(),
            dtype: Some(DataType::Fp32),
            shape: vec![-1, width],
        };
        let (spec, _) = spec::build_spec(
            "m",
            1,
            Default::default(),
            &[tensor("X", 10)],
            &[tensor("variable", 1)],
            &defaults,
        )
        .expect("the fuzz model's spec");
        let definitions = Definitions::from_toml(FEATURES).expect("the fuzz feature definitions");
        (spec, definitions)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(declared) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let (spec, definitions) = context();
    let _ = Pipeline::parse(&declared, spec, definitions, &std::collections::HashMap::new());
});
