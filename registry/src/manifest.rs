//! The manifest: everything known about one model version, written once, last, beside the
//! artifact (`{root}/{model}/{version}/manifest.json`). Its JSON Schema is
//! `registry/schema/manifest.schema.json`; `schema_version` says which one a file follows.
//!
//! What changes after a push (stage, approver, aliases) lives in the model's refs log, not here:
//! a manifest never changes once written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::onnx::Signature;

/// The manifest schema this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// One model version's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    pub version: u64,
    /// `onnx` or `torchscript`.
    pub framework: String,
    /// RFC 3339 time of the push.
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Every file of the version, with its checksum; serving verifies them before loading.
    pub files: Vec<FileEntry>,
    pub signature: Signature,
    /// Serving configuration in Triton's ModelConfig JSON (batching, instances, parameters).
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Conditions the metrics must meet for the version to reach production.
    #[serde(default)]
    pub gates: Vec<Gate>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub lineage: Lineage,
    /// The `/v1/predict` pipeline (feature views, encoders, post-processing); opaque here.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub pipeline: serde_json::Value,
    /// What the training data looked like, for the drift monitor (`baseline::DriftBaseline`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub drift_baseline: serde_json::Value,
}

/// A file of a model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the version folder.
    pub path: String,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
    pub size: u64,
}

/// Where a version came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dataset_uri: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub code_version: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

/// A metric condition, e.g. `rmse <= 0.2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub metric: String,
    pub op: GateOp,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateOp {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

impl std::fmt::Display for GateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateOp::Lt => "<",
            GateOp::Le => "<=",
            GateOp::Gt => ">",
            GateOp::Ge => ">=",
        })
    }
}

impl Gate {
    /// Parses `metric<=value` (also `<`, `>`, `>=`).
    pub fn parse(text: &str) -> Result<Self, String> {
        for (symbol, op) in [
            ("<=", GateOp::Le),
            (">=", GateOp::Ge),
            ("<", GateOp::Lt),
            (">", GateOp::Gt),
        ] {
            if let Some((metric, value)) = text.split_once(symbol) {
                let value = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("gate '{text}': '{}' is not a number", value.trim()))?;
                return Ok(Gate {
                    metric: metric.trim().to_string(),
                    op,
                    value,
                });
            }
        }
        Err(format!(
            "gate '{text}' must look like metric<=value (or <, >, >=)"
        ))
    }

    /// Why the metrics fail this gate, or `None` when they pass.
    pub fn failure(&self, metrics: &BTreeMap<String, f64>) -> Option<String> {
        let Some(&actual) = metrics.get(&self.metric) else {
            return Some(format!(
                "gate {self} needs metric '{}', which the version does not report",
                self.metric
            ));
        };
        let passes = match self.op {
            GateOp::Lt => actual < self.value,
            GateOp::Le => actual <= self.value,
            GateOp::Gt => actual > self.value,
            GateOp::Ge => actual >= self.value,
        };
        (!passes).then(|| format!("gate {self} fails: {} is {actual}", self.metric))
    }
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.metric, self.op, self.value)
    }
}

impl Manifest {
    /// Reads a manifest, refusing schemas this code does not know.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid manifest: {e}"))?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "manifest schema_version {} is not supported (this build reads {SCHEMA_VERSION})",
                manifest.schema_version
            ));
        }
        Ok(manifest)
    }

    /// Every gate that fails, as messages; empty when all pass.
    pub fn gate_failures(&self) -> Vec<String> {
        self.gates
            .iter()
            .filter_map(|g| g.failure(&self.metrics))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_parse_and_judge() {
        let gate = Gate::parse("rmse <= 0.2").unwrap();
        assert_eq!(gate.op, GateOp::Le);
        let mut metrics = BTreeMap::new();
        metrics.insert("rmse".to_string(), 0.15);
        assert_eq!(gate.failure(&metrics), None);
        metrics.insert("rmse".to_string(), 0.25);
        assert_eq!(
            gate.failure(&metrics).unwrap(),
            "gate rmse <= 0.2 fails: rmse is 0.25"
        );
        assert!(
            Gate::parse("auc>=0.9")
                .unwrap()
                .failure(&BTreeMap::new())
                .unwrap()
                .contains("does not report")
        );
        assert!(Gate::parse("auc=0.9").is_err());
        assert!(
            Gate::parse("auc>=high")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn unknown_schema_versions_are_refused() {
        let text = br#"{"schema_version": 9, "name": "m", "version": 1, "framework": "onnx",
            "created_at": "2026-01-01T00:00:00Z", "created_by": "x", "files": [], "signature": {"inputs": [], "outputs": []}}"#;
        assert!(
            Manifest::from_json(text)
                .unwrap_err()
                .contains("schema_version 9")
        );
    }
}
