//! The registry's guarantees on real stores (a local folder and the in-memory store): versions are
//! immutable and never handed out twice, references never lose an update, stage rules and gates
//! hold, and corrupted files are caught. Races against a barrier and against S3 are in
//! tests/tests/registry_s3.rs.

use std::collections::BTreeMap;

use bytes::Bytes;
use marquee_registry::manifest::{Gate, Lineage, SCHEMA_VERSION};
use marquee_registry::{Manifest, PushFile, Quiet, Registry, RegistryError, Stage, sha256_hex};

fn draft(metrics: &[(&str, f64)], gates: &[&str]) -> Manifest {
    Manifest {
        schema_version: SCHEMA_VERSION,
        name: String::new(),
        version: 0,
        framework: "onnx".into(),
        created_at: marquee_registry::now(),
        created_by: "tester".into(),
        description: String::new(),
        files: Vec::new(),
        signature: Default::default(),
        config: serde_json::json!({"max_batch_size": 8}),
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        gates: gates.iter().map(|g| Gate::parse(g).unwrap()).collect(),
        tags: BTreeMap::new(),
        lineage: Lineage::default(),
        pipeline: serde_json::Value::Null,
        drift_baseline: serde_json::Value::Null,
    }
}

fn file(contents: &'static [u8]) -> Vec<PushFile> {
    vec![PushFile {
        path: "model.onnx".into(),
        contents: Bytes::from_static(contents),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_round_trip_on_a_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().join("reg").to_str().unwrap()).unwrap();
    let big: Vec<u8> = (0..40_000_000u32).map(|i| (i % 251) as u8).collect();
    let pushed = registry
        .push(
            "gbr",
            vec![
                PushFile {
                    path: "model.onnx".into(),
                    contents: Bytes::from(big.clone()),
                },
                PushFile {
                    path: "extra/vocab.txt".into(),
                    contents: Bytes::from_static(b"a\nb\n"),
                },
            ],
            draft(&[("rmse", 0.1)], &[]),
            &Quiet,
        )
        .await
        .unwrap();
    assert_eq!(pushed.version, 1);
    assert_eq!(pushed.files[0].sha256, sha256_hex(&big));
    assert_eq!(pushed.files[0].size, big.len() as u64);
    let again = registry
        .push("gbr", file(b"v2"), draft(&[], &[]), &Quiet)
        .await
        .unwrap();
    assert_eq!(again.version, 2);
    assert_eq!(registry.versions("gbr").await.unwrap(), vec![1, 2]);
    assert_eq!(registry.models().await.unwrap(), vec!["gbr"]);

    let out = tempfile::tempdir().unwrap();
    let pulled = registry.pull("gbr", 1, out.path(), &Quiet).await.unwrap();
    assert_eq!(pulled, pushed);
    assert_eq!(std::fs::read(out.path().join("model.onnx")).unwrap(), big);
    assert_eq!(
        std::fs::read(out.path().join("extra/vocab.txt")).unwrap(),
        b"a\nb\n"
    );
    assert!(
        registry
            .verify("gbr", 1)
            .await
            .unwrap()
            .iter()
            .all(|c| c.ok())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_without_manifest_does_not_exist_and_corruption_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let registry = Registry::open(root.to_str().unwrap()).unwrap();
    registry
        .push("m", file(b"good bytes"), draft(&[], &[]), &Quiet)
        .await
        .unwrap();
    // An interrupted push: files but no manifest.
    std::fs::create_dir_all(root.join("m/2")).unwrap();
    std::fs::write(root.join("m/2/model.onnx"), b"half").unwrap();
    assert_eq!(registry.versions("m").await.unwrap(), vec![1]);
    assert!(matches!(
        registry.manifest("m", 2).await,
        Err(RegistryError::VersionNotFound { .. })
    ));
    // The next push skips the number that folder holds.
    assert_eq!(
        registry
            .push("m", file(b"v3"), draft(&[], &[]), &Quiet)
            .await
            .unwrap()
            .version,
        3
    );

    std::fs::write(root.join("m/1/model.onnx"), b"evil bytes").unwrap();
    let checks = registry.verify("m", 1).await.unwrap();
    assert!(!checks[0].ok());
    let manifest = registry.manifest("m", 1).await.unwrap();
    let err = registry
        .file(&manifest, &manifest.files[0])
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Corrupt(_)));
    assert!(err.to_string().contains("the manifest says"), "{err}");
    assert_eq!(err.exit_code(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pushes_never_share_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().to_str().unwrap()).unwrap();
    let pushes = (0..12).map(|_| {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry
                .push("m", file(b"x"), draft(&[], &[]), &Quiet)
                .await
                .unwrap()
                .version
        })
    });
    let mut versions: Vec<u64> = futures::future::join_all(pushes)
        .await
        .into_iter()
        .map(|v| v.unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=12).collect::<Vec<_>>());
    assert_eq!(registry.versions("m").await.unwrap(), versions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_move_one_step_and_production_needs_approval_and_gates() {
    let registry = Registry::open("memory://").unwrap();
    registry
        .push(
            "m",
            file(b"1"),
            draft(&[("auc", 0.80)], &["auc >= 0.85"]),
            &Quiet,
        )
        .await
        .unwrap();
    registry
        .push(
            "m",
            file(b"2"),
            draft(&[("auc", 0.91)], &["auc >= 0.85"]),
            &Quiet,
        )
        .await
        .unwrap();
    let refused = |r: Result<_, RegistryError>| match r {
        Err(RegistryError::Refused(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = refused(
        registry
            .promote("m", 2, Stage::Production, Some("ana"), "bo", "")
            .await,
    );
    assert!(m.contains("dev -> staging -> production"), "{m}");
    registry
        .promote("m", 1, Stage::Staging, None, "bo", "try")
        .await
        .unwrap();
    let m = refused(
        registry
            .promote("m", 1, Stage::Production, Some("ana"), "bo", "")
            .await,
    );
    assert!(m.contains("gate auc >= 0.85 fails: auc is 0.8"), "{m}");
    registry
        .promote("m", 2, Stage::Staging, None, "bo", "better")
        .await
        .unwrap();
    let m = refused(
        registry
            .promote("m", 2, Stage::Production, None, "bo", "")
            .await,
    );
    assert!(m.contains("--approved-by"), "{m}");
    let refs = registry
        .promote("m", 2, Stage::Production, Some("ana"), "bo", "ship it")
        .await
        .unwrap();
    assert_eq!(refs.aliases.get("production"), Some(&2));
    assert_eq!(refs.stage(2), Stage::Production);
    assert_eq!(refs.stages[&2].approved_by.as_deref(), Some("ana"));
    assert_eq!(refs.stage(1), Stage::Dev, "v1 left staging when v2 took it");
    assert!(refused(registry.set_alias("m", "production", 1, "bo", "").await).contains("promote"));

    refused(registry.archive("m", 2, "bo", "").await);
    registry.archive("m", 1, "bo", "superseded").await.unwrap();
    assert!(refused(registry.set_alias("m", "canary", 1, "bo", "").await).contains("archived"));
    registry
        .set_alias("m", "canary", 2, "bo", "")
        .await
        .unwrap();
    assert_eq!(registry.resolve("m", "canary").await.unwrap(), 2);
    assert!(matches!(
        registry.resolve("m", "nope").await,
        Err(RegistryError::VersionNotFound { .. })
    ));

    let history = registry.history("m").await.unwrap();
    let actions: Vec<_> = history
        .iter()
        .map(|r| r.change.as_ref().unwrap().action.name())
        .collect();
    assert_eq!(
        actions,
        vec!["promote", "promote", "promote", "archive", "alias set"]
    );
    assert_eq!(history[2].change.as_ref().unwrap().reason, "ship it");
    assert_eq!(history[2].change.as_ref().unwrap().previous, None);
    assert_eq!(
        registry.refs_after("m", 5).await.unwrap(),
        None,
        "nothing after the latest revision"
    );
    assert_eq!(
        registry.refs_after("m", 3).await.unwrap().unwrap().revision,
        5
    );
}

/// The JSON Schema in registry/schema describes exactly what the registry writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_manifests_follow_the_published_schema() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../schema/manifest.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let registry = Registry::open("memory://").unwrap();
    let mut manifest = draft(&[("rmse", 0.1)], &["rmse<=0.2"]);
    manifest.tags.insert("team".into(), "pricing".into());
    manifest.lineage.dataset_uri = "s3://data/x.parquet".into();
    manifest.signature = marquee_registry::onnx::Signature {
        inputs: vec![marquee_registry::onnx::TensorSignature {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 10],
        }],
        outputs: vec![],
    };
    let pushed = registry
        .push("m", file(b"bytes"), manifest, &Quiet)
        .await
        .unwrap();
    let written = serde_json::to_value(&pushed).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&written)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let mut broken = written.clone();
    broken.as_object_mut().unwrap().remove("files");
    assert!(!validator.is_valid(&broken), "the schema requires files");
    broken = written;
    broken["files"][0]["sha256"] = "not hex".into();
    assert!(!validator.is_valid(&broken), "the schema checks checksums");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_revisions_are_written_once_and_the_newest_is_read() {
    let registry = Registry::open("memory://").unwrap();
    registry
        .push("m", file(b"v1"), draft(&[], &[]), &Quiet)
        .await
        .unwrap();
    assert!(registry.deployments_from("m", 0).await.unwrap().is_empty());
    registry
        .write_deployment("m", 1, 1, &serde_json::json!({"state": "progressing"}))
        .await
        .unwrap();
    registry
        .write_deployment("m", 1, 2, &serde_json::json!({"state": "rolled_back"}))
        .await
        .unwrap();
    let raced = registry
        .write_deployment("m", 1, 2, &serde_json::json!({"state": "promoted"}))
        .await;
    assert!(
        matches!(raced, Err(RegistryError::Conflict(_))),
        "{raced:?}"
    );
    registry
        .write_deployment("m", 2, 1, &serde_json::json!({"state": "progressing"}))
        .await
        .unwrap();
    assert_eq!(
        registry.deployments_from("m", 0).await.unwrap(),
        vec![(1, 2), (2, 1)]
    );
    assert_eq!(
        registry.deployments_from("m", 2).await.unwrap(),
        vec![(2, 1)]
    );
    let latest = registry.deployment_after("m", 1, 0).await.unwrap().unwrap();
    assert_eq!(latest.revision, 2);
    assert_eq!(latest.state["state"], "rolled_back");
    assert!(
        registry
            .deployment_after("m", 1, 2)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        registry
            .write_deployment("nope", 1, 1, &serde_json::json!({}))
            .await,
        Err(RegistryError::ModelNotFound(_))
    ));
    // The versions and references are untouched by the deployments folder.
    assert_eq!(registry.versions("m").await.unwrap(), vec![1]);
}
