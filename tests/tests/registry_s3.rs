//! The registry on a real S3-compatible server (moto, started here on loopback): the conditional
//! requests it relies on, push/pull with multipart uploads, racing pushes and promotions, and
//! serving that follows a registry in a bucket.

use std::sync::Arc;

use bytes::Bytes;
use marquee_registry::{Manifest, PushFile, Quiet, Registry, RegistryError, Stage};
use marquee_tests::{RacingStore, S3Server, TestServer, fixtures};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde_json::json;

fn manifest() -> Manifest {
    marquee_tests::manifest(json!({"max_batch_size": 8, "dynamic_batching": {}}))
}

fn one_file(contents: Bytes) -> Vec<PushFile> {
    vec![PushFile {
        path: "model.onnx".into(),
        contents,
    }]
}

fn s3_store(s3: &S3Server) -> Arc<dyn ObjectStore> {
    let url = url::Url::parse(&s3.url("")).unwrap();
    let (store, _) = object_store::parse_url_opts(&url, s3.options()).unwrap();
    Arc::from(store)
}

/// The registry's safety rests on create-only puts (`If-None-Match: *`) and on listing after an
/// offset; the server must honour both, or no other test here means anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_honours_create_only_puts_and_offset_listing() {
    let s3 = S3Server::start().await;
    let store = s3_store(&s3);
    let path = Path::from("proof/a");
    let create = || PutOptions::from(PutMode::Create);
    store
        .put_opts(&path, PutPayload::from_static(b"first"), create())
        .await
        .unwrap();
    let second = store
        .put_opts(&path, PutPayload::from_static(b"second"), create())
        .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        kept,
        Bytes::from_static(b"first"),
        "the losing put changed nothing"
    );
    store
        .put(&Path::from("proof/b"), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    store
        .put(&Path::from("proof/c"), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    use futures::TryStreamExt;
    let after: Vec<_> = store
        .list_with_offset(Some(&Path::from("proof")), &path)
        .try_collect()
        .await
        .unwrap();
    let names: Vec<_> = after.iter().map(|o| o.location.to_string()).collect();
    assert_eq!(names, vec!["proof/b", "proof/c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_and_promote_on_s3() {
    let s3 = S3Server::start().await;
    let registry = Registry::open_with(&s3.url("models"), &s3.options()).unwrap();
    // Above the multipart threshold: uploaded in parts.
    let big: Vec<u8> = (0..20_000_000u32).map(|i| (i % 241) as u8).collect();
    let pushed = registry
        .push("m", one_file(Bytes::from(big.clone())), manifest(), &Quiet)
        .await
        .unwrap();
    assert_eq!(pushed.version, 1);
    let out = tempfile::tempdir().unwrap();
    registry.pull("m", 1, out.path(), &Quiet).await.unwrap();
    assert_eq!(std::fs::read(out.path().join("model.onnx")).unwrap(), big);
    assert!(
        registry
            .verify("m", 1)
            .await
            .unwrap()
            .iter()
            .all(|c| c.ok())
    );
    registry
        .promote("m", 1, Stage::Staging, None, "tests", "on s3")
        .await
        .unwrap();
    assert_eq!(registry.resolve("m", "staging").await.unwrap(), 1);
    assert_eq!(registry.history("m").await.unwrap().len(), 1);
    assert_eq!(registry.models().await.unwrap(), vec!["m"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pushes_on_s3_never_share_a_version() {
    let s3 = S3Server::start().await;
    let registry = Registry::open_with(&s3.url("race"), &s3.options()).unwrap();
    let pushes = (0..8).map(|i| {
        let registry = registry.clone();
        tokio::spawn(async move {
            let contents = Bytes::from(format!("model {i}"));
            registry
                .push("m", one_file(contents), manifest(), &Quiet)
                .await
                .unwrap()
                .version
        })
    });
    let mut versions: Vec<u64> = futures::future::join_all(pushes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
}

/// A registry on `store` whose first two reference changes race, with versions 1 and 2 of "m".
async fn racing_registry(store: Arc<dyn ObjectStore>) -> Registry {
    let registry = Registry::with_store(
        Arc::new(RacingStore::new(store)),
        Path::from("racing"),
        "racing",
    );
    for i in 0..2 {
        registry
            .push(
                "m",
                one_file(Bytes::from(format!("v{i}"))),
                manifest(),
                &Quiet,
            )
            .await
            .unwrap();
    }
    registry
}

async fn one_promotion_wins(store: Arc<dyn ObjectStore>) {
    let registry = racing_registry(store).await;
    let promote = |version: u64, by: &'static str| {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry
                .promote("m", version, Stage::Staging, None, by, "")
                .await
        })
    };
    let (a, b) = (promote(1, "ana"), promote(2, "bo"));
    let results = [a.await.unwrap(), b.await.unwrap()];
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let losers: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(winners.len(), 1, "exactly one promotion wins: {results:?}");
    assert!(
        matches!(losers[0], RegistryError::Conflict(_)),
        "{losers:?}"
    );
    assert_eq!(losers[0].exit_code(), 4);
    let refs = registry.refs("m").await.unwrap();
    assert_eq!(refs.revision, 1, "the loser wrote nothing");
    assert_eq!(&refs, winners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_promotions_one_wins_the_other_conflicts() {
    one_promotion_wins(Arc::new(object_store::memory::InMemory::new())).await;
    let local = tempfile::tempdir().unwrap();
    one_promotion_wins(Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(local.path()).unwrap(),
    ))
    .await;
    let s3 = S3Server::start().await;
    one_promotion_wins(s3_store(&s3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_follows_a_registry_in_a_bucket() {
    let s3 = S3Server::start().await;
    let registry = Registry::open_with(&s3.url("prod"), &s3.options()).unwrap();
    let gbr = std::fs::read(fixtures().join("models/gbr/1/model.onnx")).unwrap();
    registry
        .push("pricing", one_file(Bytes::from(gbr)), manifest(), &Quiet)
        .await
        .unwrap();
    registry
        .promote("pricing", 1, Stage::Staging, None, "tests", "")
        .await
        .unwrap();
    let options: Vec<String> = s3
        .options()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let server = TestServer::start_with_config(|config| {
        config.registry = Some(s3.url("prod"));
        config.store_options = options;
        config.registry_poll_seconds = 0.1;
    })
    .await;
    let body = json!({"inputs": [{"name": "X", "shape": [1, 10], "datatype": "FP32", "data": vec![0.5; 10]}]});
    let (status, answer) = server
        .post("/v2/models/pricing/versions/staging/infer", body)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_version"], "1");
    server.stop().await;
}

async fn different_aliases_both_land(store: Arc<dyn ObjectStore>) {
    let registry = racing_registry(store).await;
    let set = |alias: &'static str, version: u64| {
        let registry = registry.clone();
        tokio::spawn(async move { registry.set_alias("m", alias, version, alias, "").await })
    };
    let (a, b) = (set("shadow", 1), set("challenger", 2));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        a.is_ok() && b.is_ok(),
        "a change still valid on the new references is re-applied: {a:?} {b:?}"
    );
    let refs = registry.refs("m").await.unwrap();
    assert_eq!(refs.revision, 2);
    assert_eq!(refs.aliases["shadow"], 1);
    assert_eq!(refs.aliases["challenger"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_changes_to_different_aliases_both_land() {
    different_aliases_both_land(Arc::new(object_store::memory::InMemory::new())).await;
    let local = tempfile::tempdir().unwrap();
    different_aliases_both_land(Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(local.path()).unwrap(),
    ))
    .await;
}
