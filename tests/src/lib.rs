//! Test harness shared by the end-to-end tests: finds the fixtures that tests/run.sh builds,
//! assembles model repositories from them, and starts a real `marquee serve` on free loopback
//! ports inside the test process.

pub mod body;

use std::path::{Path, PathBuf};

use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_serving::{ServeConfig, Server};
use tonic::transport::Channel;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `.marquee/fixtures`, built by tests/fixtures/make_fixtures.py.
pub fn fixtures() -> PathBuf {
    let dir = root().join(".marquee/fixtures");
    assert!(
        dir.join("reference.json").is_file(),
        "test fixtures are missing: run tests/run.sh (or deploy/setup.sh --test && .marquee/venv/bin/python tests/fixtures/make_fixtures.py)"
    );
    dir
}

/// The `marquee` binary of this build (tests/run.sh builds every target before testing).
pub fn marquee_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .join("marquee");
    assert!(
        binary.is_file(),
        "{} is missing: build it first (cargo build --release -p marquee-cli)",
        binary.display()
    );
    binary
}

/// What one run of the `marquee` binary left behind.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// The `--json` output of a run that must have succeeded.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "the command failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json printed no JSON ({e}): {}", self.stdout))
    }
}

/// Runs `marquee ARGS` as a process with `env` added (and quiet logs), as scripts run it.
pub fn run_marquee(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let output = std::process::Command::new(marquee_binary())
        .args(args)
        .envs(env.iter().copied())
        .env("MARQUEE_LOG", "warn")
        .output()
        .expect("marquee runs");
    CliRun {
        code: output
            .status
            .code()
            .expect("the CLI exits, it is not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A manifest for a version pushed by a test: ONNX, with `config` as its serving configuration.
pub fn manifest(config: serde_json::Value) -> marquee_registry::Manifest {
    marquee_registry::Manifest {
        schema_version: marquee_registry::manifest::SCHEMA_VERSION,
        name: String::new(),
        version: 0,
        framework: "onnx".into(),
        created_at: marquee_registry::now(),
        created_by: "tests".into(),
        description: String::new(),
        files: Vec::new(),
        signature: Default::default(),
        config,
        metrics: Default::default(),
        gates: Vec::new(),
        tags: Default::default(),
        lineage: Default::default(),
        pipeline: serde_json::Value::Null,
        drift_baseline: serde_json::Value::Null,
    }
}

/// Outputs Python onnxruntime computed for the real models (see make_fixtures.py).
pub fn reference() -> serde_json::Value {
    reference_file("reference.json")
}

/// The numbers of a JSON array (a reference tensor's or a response's `data`).
pub fn json_numbers(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

/// A reference case (`{"inputs": {name: {shape, datatype, data}}}`) as a v2 JSON request.
pub fn reference_request(case: &serde_json::Value) -> serde_json::Value {
    let inputs: Vec<serde_json::Value> = case["inputs"]
        .as_object()
        .expect("reference inputs")
        .iter()
        .map(|(name, t)| serde_json::json!({"name": name, "shape": t["shape"], "datatype": t["datatype"], "data": t["data"]}))
        .collect();
    serde_json::json!({ "inputs": inputs })
}

/// Asserts that a v2 JSON response carries every output of a reference case with its shape (and
/// datatype, where the reference gives one) and values within `tolerance`.
pub fn assert_reference_outputs(
    body: &serde_json::Value,
    case: &serde_json::Value,
    tolerance: f64,
    what: &str,
) {
    let outputs = body["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no outputs in {body}"));
    for (name, want) in case["outputs"].as_object().expect("reference outputs") {
        let got = outputs
            .iter()
            .find(|o| o["name"] == *name)
            .unwrap_or_else(|| panic!("{what} returned no {name}: {body}"));
        assert_eq!(got["shape"], want["shape"], "{what}/{name} shape");
        if !want["datatype"].is_null() {
            assert_eq!(got["datatype"], want["datatype"], "{what}/{name} datatype");
        }
        assert_close(
            &json_numbers(&got["data"]),
            &json_numbers(&want["data"]),
            tolerance,
            &format!("{what}/{name}"),
        );
    }
}

/// The `q` quantile (0..=1) of sorted values; NaN when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Outputs torch computed for the TorchScript fixtures (see make_torch_fixtures.py).
pub fn torch_reference() -> serde_json::Value {
    reference_file("torch_reference.json")
}

fn reference_file(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap_or_else(|e| {
        panic!("{name} is readable ({e}); run tests/fixtures/make_fixtures.py")
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is JSON: {e}"))
}

/// A throwaway model repository assembled from fixture models.
pub struct Repository {
    dir: tempfile::TempDir,
}

impl Repository {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds fixture model `source` as `name`, version 1, with `config` as its config.pbtxt
    /// (`None` keeps the fixture's own configuration, if it has one).
    pub fn add(self, name: &str, source: &str, config: Option<&str>) -> Self {
        self.add_version(name, source, 1, config)
    }

    pub fn add_version(self, name: &str, source: &str, version: u64, config: Option<&str>) -> Self {
        let from = fixtures().join("models").join(source);
        let to = self.dir.path().join(name);
        std::fs::create_dir_all(to.join(version.to_string())).expect("model folder");
        // The fixture's version folder as it is: model.onnx, or model.pt for TorchScript.
        for file in std::fs::read_dir(from.join("1")).expect("fixture version folder") {
            let file = file.expect("fixture file");
            std::fs::copy(
                file.path(),
                to.join(version.to_string()).join(file.file_name()),
            )
            .expect("model copied");
        }
        match config {
            Some(text) => std::fs::write(to.join("config.pbtxt"), text).expect("config written"),
            None if from.join("config.pbtxt").is_file() => {
                let text = std::fs::read_to_string(from.join("config.pbtxt")).expect("config read");
                std::fs::write(
                    to.join("config.pbtxt"),
                    text.replace(&format!("name: \"{source}\""), &format!("name: \"{name}\"")),
                )
                .expect("config written");
            }
            None => {}
        }
        self
    }

    /// Writes a file into the repository (for broken models and the like).
    pub fn write(self, path: &str, contents: &[u8]) -> Self {
        let full = self.dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("file has a folder")).expect("folder");
        std::fs::write(full, contents).expect("file written");
        self
    }
}

impl Default for Repository {
    fn default() -> Self {
        Self::new()
    }
}

/// A server running in this process on free loopback ports.
pub struct TestServer {
    server: Server,
    /// Kept so the repository outlives the server that reads it.
    _repository: Option<Repository>,
    pub http: String,
    pub grpc: String,
    pub metrics: String,
    /// The operator's routes' own address (`--admin-port`), when the server has one.
    pub admin: Option<String>,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(repository: Repository) -> Self {
        Self::start_with(repository, |_| {}).await
    }

    pub async fn start_with(repository: Repository, adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = ServeConfig {
            model_repository: Some(repository.path().to_string_lossy().into_owned()),
            ..Self::loopback()
        };
        adjust(&mut config);
        Self::launch(config, Some(repository)).await
    }

    /// A server following the registry at `registry`, looking for changes every 100 ms.
    pub async fn start_registry(registry: &Path) -> Self {
        let config = ServeConfig {
            registry: Some(registry.to_string_lossy().into_owned()),
            registry_poll_seconds: 0.1,
            ..Self::loopback()
        };
        Self::launch(config, None).await
    }

    /// A server configured by `adjust` from loopback defaults, with no repository of its own.
    pub async fn start_with_config(adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = Self::loopback();
        adjust(&mut config);
        Self::launch(config, None).await
    }

    fn loopback() -> ServeConfig {
        ServeConfig {
            host: [127, 0, 0, 1].into(),
            http_port: 0,
            grpc_port: 0,
            metrics_port: 0,
            ..Default::default()
        }
    }

    async fn launch(config: ServeConfig, repository: Option<Repository>) -> Self {
        let server = Server::start(&config).await.expect("server starts");
        Self {
            http: format!("http://{}", server.http_addr()),
            grpc: format!("http://{}", server.grpc_addr()),
            metrics: format!("http://{}/metrics", server.metrics_addr()),
            admin: server.admin_addr().map(|a| format!("http://{a}")),
            server,
            _repository: repository,
            client: reqwest::Client::new(),
        }
    }

    pub async fn grpc_client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(self.grpc.clone())
            .await
            .expect("gRPC connects")
    }

    /// The Prometheus text the metrics port serves now.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one series (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.http))
            .send()
            .await
            .expect("GET answered");
        split(response).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.http))
            .json(&body)
            .send()
            .await
            .expect("POST answered");
        split(response).await
    }

    pub async fn stop(self) {
        self.server.shutdown().await;
    }
}

async fn split(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body read");
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    (status, json)
}

/// A real S3-compatible server (moto, installed by deploy/setup.sh --test) on a free loopback
/// port, with one bucket; stopped when dropped.
pub struct S3Server {
    process: std::process::Child,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    pub async fn start() -> Self {
        let port = free_port();
        let binary = root().join(".marquee/venv/bin/moto_server");
        assert!(
            binary.is_file(),
            "moto_server is missing: run deploy/setup.sh --test"
        );
        let process = std::process::Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = Self {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "registry".into(),
        };
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        loop {
            if let Ok(r) = client
                .put(format!("{}/{}", server.endpoint, server.bucket))
                .send()
                .await
            {
                assert!(
                    r.status().is_success(),
                    "bucket creation failed: {}",
                    r.status()
                );
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "moto_server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        server
    }

    /// `s3://bucket/prefix` for this server.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The object-store options that reach this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A store that holds the first two writes of a registry refs revision until both are waiting,
/// so two changes are made from the same revision: a real race, every time, on any store. Later
/// writes (a change decided again after losing) pass straight through.
#[derive(Debug)]
pub struct RacingStore {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
    gate: tokio::sync::Barrier,
    gated: std::sync::atomic::AtomicUsize,
}

impl RacingStore {
    pub fn new(inner: std::sync::Arc<dyn object_store::ObjectStore>) -> Self {
        Self {
            inner,
            gate: tokio::sync::Barrier::new(2),
            gated: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl std::fmt::Display for RacingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RacingStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for RacingStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if location.as_ref().contains("/refs/")
            && self.gated.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
        {
            self.gate.wait().await;
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&object_store::path::Path>,
        offset: &object_store::path::Path,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A gRPC inference request for a gbr-shaped model (`X`, FP32 [rows, 10], raw contents).
pub fn gbr_grpc_request(model: &str, rows: usize) -> marquee_proto::inference::ModelInferRequest {
    use marquee_proto::inference as pb;
    let values: Vec<f32> = (0..rows * 10).map(|i| i as f32 / 7.0).collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 10],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&values).into()],
        ..Default::default()
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// f32 values from little-endian bytes.
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Asserts two float sequences agree within `tolerance` (absolute), naming the first difference.
pub fn assert_close(got: &[f64], want: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance,
            "{what}: element {i} is {g}, Python onnxruntime gives {w} (tolerance {tolerance})"
        );
    }
}

/// A free loopback port for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Kills a test's server process at once, as a crash would, and reaps it.
fn kill_child(process: &mut Option<std::process::Child>) {
    if let Some(mut child) = process.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A real Redis (`redis-server`, installed by deploy/setup.sh --test) on a free loopback port,
/// with no persistence; it can be killed and restarted on the same port; stopped when dropped.
pub struct RedisServer {
    process: Option<std::process::Child>,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = free_port();
        let mut server = Self {
            process: None,
            port,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        kill_child(&mut self.process);
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// Redis stuck on a slow command or a full network path.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let process = self.process.as_ref().expect("redis-server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &process.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts the server (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let process = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (deploy/setup.sh --test installs it)");
        self.process = Some(process);
        let started = std::time::Instant::now();
        loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").await.is_ok()
                    && stream.read_exact(&mut reply).await.is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "redis-server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Kafka-protocol broker (tansu, installed by deploy/setup.sh --test) on a free loopback
/// port, keeping topics in memory: a restart brings it back empty, as a lost broker would.
/// Nothing that uses it may depend on tansu: the clients are librdkafka's.
pub struct KafkaBroker {
    process: Option<std::process::Child>,
    pub port: u16,
}

impl KafkaBroker {
    pub async fn start() -> Self {
        let port = free_port();
        let mut broker = Self {
            process: None,
            port,
        };
        broker.restart().await;
        broker
    }

    /// `host:port`, as `bootstrap.servers` takes it.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        kill_child(&mut self.process);
    }

    /// Starts the broker (again) on the same port, empty, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let process = std::process::Command::new(root().join(".marquee/bin/tansu"))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts (deploy/setup.sh --test installs it)");
        self.process = Some(process);
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "tansu did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP proxy that counts how many separate reads carried a client's requests: the
/// number of round trips a client makes, whatever its library claims.
pub struct CountingProxy {
    pub port: u16,
    client_reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("proxy address").port();
        let client_reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = client_reads.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0u8; 1 << 20];
                        loop {
                            let n = client_read.read(&mut buffer).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            server_write.write_all(&buffer[..n]).await?;
                        }
                    };
                    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
                    let _ = tokio::join!(upstream, downstream);
                });
            }
        });
        Self { port, client_reads }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Reads of client data so far.
    pub fn client_reads(&self) -> usize {
        self.client_reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Every Parquet file under `dir` (recursively), read whole; panics on a file left unclosed
/// (`.partial`), which no reader may ever see.
pub fn read_parquet_tree(dir: &Path) -> Vec<arrow_array::RecordBatch> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in
            std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                folders.push(path);
            } else {
                assert_eq!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("parquet"),
                    "{} is not closed",
                    path.display()
                );
                files.push(path);
            }
        }
    }
    files.sort();
    files.iter().map(|f| read_parquet(f)).collect()
}

/// A string column's values (nulls as empty), to compare in tests.
pub fn string_column(batch: &arrow_array::RecordBatch, name: &str) -> Vec<String> {
    use arrow_array::cast::AsArray;
    let column = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", batch.schema()));
    column
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect()
}

/// A whole Parquet file as one record batch.
pub fn read_parquet(path: &Path) -> arrow_array::RecordBatch {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("a Parquet file")
        .build()
        .expect("a Parquet reader");
    let batches: Vec<arrow_array::RecordBatch> = reader.map(|b| b.expect("a batch")).collect();
    arrow_select::concat::concat_batches(&batches[0].schema(), &batches).expect("one schema")
}

/// A scratch folder holding a small generated world and room for a registry and a job's work.
pub struct TrainingRun {
    _dir: tempfile::TempDir,
    pub world: PathBuf,
    pub registry: PathBuf,
    pub work: PathBuf,
}

impl TrainingRun {
    /// Generates the small world of `seed`.
    pub fn small_world(seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = |name: &str| dir.path().join(name);
        let (world, registry, work) = (path("world"), path("registry"), path("work"));
        let generated = run_marquee(
            &[
                "data",
                "generate",
                "--scale",
                "small",
                "--seed",
                &seed.to_string(),
                "--out",
                world.to_str().expect("UTF-8 path"),
            ],
            &[],
        );
        assert_eq!(generated.code, 0, "{}", generated.stderr);
        Self {
            _dir: dir,
            world,
            registry,
            work,
        }
    }

    /// `marquee train <model> --json` on the world into the registry, with `extra` arguments;
    /// the job's report (`trained`).
    pub fn train(&self, model: &str, extra: &[&str]) -> serde_json::Value {
        let trained = self.run_job(model, extra);
        assert_eq!(trained.code, 0, "{}", trained.stderr);
        trained.json()["trained"].clone()
    }

    /// `marquee train <model> --json` as it ran, whether or not it succeeded.
    pub fn run_job(&self, model: &str, extra: &[&str]) -> CliRun {
        let text = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
        let (world, registry, work) = (text(&self.world), text(&self.registry), text(&self.work));
        let mut args = vec![
            "train",
            model,
            "--data",
            &world,
            "--registry",
            &registry,
            "--work",
            &work,
            "--json",
        ];
        args.extend_from_slice(extra);
        run_marquee(&args, &[])
    }

    /// `marquee registry show <model> <version> --json`: the manifest with stage and aliases.
    pub fn show(&self, model: &str, version: &str) -> serde_json::Value {
        let registry = self.registry.to_str().expect("UTF-8 path");
        let shown = run_marquee(
            &[
                "registry",
                "--registry",
                registry,
                "show",
                model,
                version,
                "--json",
            ],
            &[],
        );
        assert_eq!(shown.code, 0, "{}", shown.stderr);
        shown.json()
    }
}

/// A `/v1/predict` pipeline for gbr that reads no store: ten request features `f0`..`f9`
/// (default: their index) into `X`, the `variable` output as the answer.
pub fn request_only_pipeline() -> Vec<u8> {
    let features: Vec<serde_json::Value> = (0..10)
        .map(|i| serde_json::json!({"name": format!("f{i}"), "default": i}))
        .collect();
    serde_json::json!({"input": "X", "features": features, "output": {"tensor": "variable"}})
        .to_string()
        .into_bytes()
}
