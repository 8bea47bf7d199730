//! `marquee registry`: the data scientists' tool. Human output by default, `--json` for scripts,
//! and exit codes scripts can rely on (see [`RegistryError::exit_code`]): 0 ok, 1 I/O or store
//! failure, 2 bad input, 3 not found, 4 conflict (another writer won; retry), 5 refused by a rule
//! (stage order, approval, gates, archive), 6 checksum mismatch.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::manifest::{Gate, Lineage, SCHEMA_VERSION};
use crate::refs::{Refs, Stage};
use crate::{Manifest, ModelRepository, Progress, PushFile, Registry, RegistryError};

/// `marquee registry …`
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry location: a folder, file://…, s3://bucket/prefix or gs://bucket/prefix.
    #[arg(
        long,
        env = "MARQUEE_REGISTRY",
        global = true,
        default_value = "registry"
    )]
    pub registry: String,
    /// Object-store option, `key=value` with object_store's keys (e.g. aws_endpoint=http://…,
    /// aws_allow_http=true); the environment (AWS_*, GOOGLE_*) is read too (repeatable).
    #[arg(long = "registry-option", global = true)]
    pub registry_options: Vec<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who makes the change (recorded in the history); defaults to $USER.
    #[arg(long, env = "USER", global = true, default_value = "unknown")]
    pub by: String,
    /// Why (recorded in the history).
    #[arg(long, global = true, default_value = "")]
    pub reason: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Push a new version; prints its number.
    Push(PushArgs),
    /// List models, or the versions of one model.
    List { model: Option<String> },
    /// Show a version (number or alias; default: the latest).
    Show {
        model: String,
        reference: Option<String>,
    },
    /// Download a version's files into a folder, verifying each.
    Pull {
        model: String,
        reference: String,
        dir: PathBuf,
    },
    /// Compare the manifests and metrics of two versions.
    Diff { model: String, a: String, b: String },
    /// Set or remove an alias.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Move a version to the next stage (dev -> staging -> production).
    Promote {
        model: String,
        version: u64,
        /// Target stage: staging or production.
        #[arg(long)]
        to: String,
        /// Who approved it; required for production.
        #[arg(long)]
        approved_by: Option<String>,
    },
    /// Production back to the version that held it before (or an earlier one with --to), in one
    /// step and without a new approval; serving follows within one poll.
    Rollback {
        model: String,
        /// An earlier production version to go back to; default: the one before the current.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Every change of a model's aliases and stages: who, when, why.
    History { model: String },
    /// Recompute the sha256 of every file of a version.
    Verify { model: String, reference: String },
    /// Hide a version from serving (refused while an alias points at it).
    Archive { model: String, version: u64 },
    /// Turn a Triton model repository into registry versions (config.pbtxt -> manifest).
    ImportTriton { dir: String },
}

#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Point an alias at a version.
    Set {
        model: String,
        alias: String,
        version: u64,
    },
    /// Remove an alias.
    Rm { model: String, alias: String },
}

#[derive(Debug, Args)]
pub struct PushArgs {
    pub model: String,
    /// The artifact: an ONNX file (signature read from it) or a TorchScript file (.pt); stored
    /// as model.onnx / model.pt, the names serving looks for.
    pub file: PathBuf,
    /// A metric, `name=value` (repeatable).
    #[arg(long = "metric")]
    pub metrics: Vec<String>,
    /// A gate for production, e.g. `rmse<=0.2` (repeatable).
    #[arg(long = "gate")]
    pub gates: Vec<String>,
    /// A tag, `key=value` (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Serving configuration: a Triton config.pbtxt or its JSON form.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Manifest fields as JSON (metrics, gates, tags, lineage, config, pipeline, drift_baseline,
    /// signature, description); flags add to and override them.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Lineage: the training dataset.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Lineage: the code version (e.g. a git commit).
    #[arg(long)]
    pub code_version: Option<String>,
    /// Lineage: a training parameter, `name=value` (repeatable).
    #[arg(long = "param")]
    pub params: Vec<String>,
    #[arg(long, default_value = "")]
    pub description: String,
}

/// Runs one command, printing its result.
pub async fn run(args: RegistryArgs) -> Result<(), RegistryError> {
    let options = parse_options(&args.registry_options)?;
    let registry = Registry::open_with(&args.registry, &options)?;
    let out = Output { json: args.json };
    let progress = BarProgress::new(!args.json && std::io::stderr().is_terminal());
    let (by, reason) = (args.by.as_str(), args.reason.as_str());
    match args.command {
        Command::Push(push) => {
            let manifest = push_version(&registry, push, by, &progress).await?;
            out.print(&manifest_json(&manifest, None), || {
                format!(
                    "{} version {} pushed ({})",
                    manifest.name,
                    manifest.version,
                    files_summary(&manifest)
                )
            });
        }
        Command::List { model: None } => {
            let mut rows = Vec::new();
            for model in registry.models().await? {
                let versions = registry.versions(&model).await?;
                let refs = registry.refs(&model).await?;
                rows.push(json!({"model": model, "versions": versions, "aliases": refs.aliases}));
            }
            out.print(&Value::Array(rows.clone()), || {
                table(
                    &["MODEL", "VERSIONS", "LATEST", "ALIASES"],
                    rows.iter()
                        .map(|r| {
                            let versions = r["versions"].as_array().map_or(0, Vec::len);
                            vec![
                                r["model"].as_str().unwrap_or_default().to_string(),
                                versions.to_string(),
                                r["versions"]
                                    .as_array()
                                    .and_then(|v| v.last())
                                    .map_or(String::new(), Value::to_string),
                                aliases_text(&r["aliases"]),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::List { model: Some(model) } => {
            let refs = registry.refs(&model).await?;
            let mut rows = Vec::new();
            for version in registry.versions(&model).await? {
                let manifest = registry.manifest(&model, version).await?;
                rows.push(manifest_json(&manifest, Some(&refs)));
            }
            if rows.is_empty() {
                return Err(RegistryError::ModelNotFound(model));
            }
            out.print(&Value::Array(rows.clone()), || {
                table(
                    &["VERSION", "STAGE", "ALIASES", "CREATED", "BY", "METRICS"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r["version"].to_string(),
                                r["stage"].as_str().unwrap_or_default().to_string(),
                                r["aliases"]
                                    .as_array()
                                    .map_or(String::new(), |a| join_strings(a)),
                                r["created_at"].as_str().unwrap_or_default().to_string(),
                                r["created_by"].as_str().unwrap_or_default().to_string(),
                                metrics_text(&r["metrics"]),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Show { model, reference } => {
            let version = match reference {
                Some(reference) => registry.resolve(&model, &reference).await?,
                None => *registry
                    .versions(&model)
                    .await?
                    .last()
                    .ok_or_else(|| RegistryError::ModelNotFound(model.clone()))?,
            };
            let manifest = registry.manifest(&model, version).await?;
            let refs = registry.refs(&model).await?;
            let shown = manifest_json(&manifest, Some(&refs));
            out.print(&shown, || {
                serde_json::to_string_pretty(&shown).expect("JSON prints")
            });
        }
        Command::Pull {
            model,
            reference,
            dir,
        } => {
            let version = registry.resolve(&model, &reference).await?;
            let manifest = registry.pull(&model, version, &dir, &progress).await?;
            out.print(&manifest_json(&manifest, None), || {
                format!(
                    "{model} version {version} pulled into {} ({}), checksums verified",
                    dir.display(),
                    files_summary(&manifest)
                )
            });
        }
        Command::Diff { model, a, b } => {
            let (va, vb) = (
                registry.resolve(&model, &a).await?,
                registry.resolve(&model, &b).await?,
            );
            let (ma, mb) = (
                registry.manifest(&model, va).await?,
                registry.manifest(&model, vb).await?,
            );
            let differences = diff(&ma, &mb);
            out.print(&json!({"model": model, "a": va, "b": vb, "differences": differences}), || {
                if differences.is_empty() {
                    format!("{model} v{va} and v{vb} have the same manifest (apart from version and time)")
                } else {
                    table(
                        &["FIELD", &format!("v{va}"), &format!("v{vb}"), "CHANGE"],
                        differences
                            .iter()
                            .map(|d| {
                                vec![
                                    d["field"].as_str().unwrap_or_default().to_string(),
                                    short(&d["a"]),
                                    short(&d["b"]),
                                    d["change"].as_str().unwrap_or_default().to_string(),
                                ]
                            })
                            .collect(),
                    )
                }
            });
        }
        Command::Alias(AliasCommand::Set {
            model,
            alias,
            version,
        }) => {
            let refs = registry
                .set_alias(&model, &alias, version, by, reason)
                .await?;
            out.print(&refs_json(&refs), || {
                format!(
                    "{model}: {alias} -> v{version} (revision {})",
                    refs.revision
                )
            });
        }
        Command::Alias(AliasCommand::Rm { model, alias }) => {
            let refs = registry.remove_alias(&model, &alias, by, reason).await?;
            out.print(&refs_json(&refs), || {
                format!(
                    "{model}: alias {alias} removed (revision {})",
                    refs.revision
                )
            });
        }
        Command::Promote {
            model,
            version,
            to,
            approved_by,
        } => {
            let stage = Stage::parse(&to).map_err(RegistryError::Invalid)?;
            let refs = registry
                .promote(&model, version, stage, approved_by.as_deref(), by, reason)
                .await?;
            out.print(&refs_json(&refs), || {
                format!(
                    "{model} v{version} is now in {} (revision {})",
                    stage.name(),
                    refs.revision
                )
            });
        }
        Command::Rollback { model, to } => {
            let refs = registry.rollback(&model, to, by, reason).await?;
            let change = refs.change.as_ref();
            let version = change.and_then(|c| c.version).unwrap_or_default();
            let previous = change
                .and_then(|c| c.previous)
                .map_or("none".to_string(), |p| format!("v{p}"));
            out.print(&refs_json(&refs), || {
                format!(
                    "{model} production is back on v{version} (was {previous}; revision {})",
                    refs.revision
                )
            });
        }
        Command::History { model } => {
            let history = registry.history(&model).await?;
            let rows: Vec<Value> = history.iter().map(refs_json).collect();
            out.print(&Value::Array(rows), || {
                table(
                    &[
                        "REVISION", "AT", "BY", "ACTION", "ALIAS", "VERSION", "PREVIOUS", "REASON",
                    ],
                    history
                        .iter()
                        .filter_map(|r| {
                            let c = r.change.as_ref()?;
                            Some(vec![
                                r.revision.to_string(),
                                c.at.clone(),
                                c.by.clone(),
                                c.action.name().to_string(),
                                c.alias.clone().unwrap_or_default(),
                                c.version.map_or(String::new(), |v| v.to_string()),
                                c.previous.map_or(String::new(), |v| v.to_string()),
                                c.reason.clone(),
                            ])
                        })
                        .collect(),
                )
            });
        }
        Command::Verify { model, reference } => {
            let version = registry.resolve(&model, &reference).await?;
            let checks = registry.verify(&model, version).await?;
            let rows: Vec<Value> = checks
                .iter()
                .map(|c| json!({"path": c.path, "expected": c.expected, "actual": c.actual, "ok": c.ok()}))
                .collect();
            out.print(
                &json!({"model": model, "version": version, "files": rows}),
                || {
                    table(
                        &["FILE", "STATUS", "SHA256"],
                        checks
                            .iter()
                            .map(|c| {
                                let status = match &c.actual {
                                    None => "MISSING",
                                    Some(_) if c.ok() => "ok",
                                    Some(_) => "MISMATCH",
                                };
                                vec![
                                    c.path.clone(),
                                    status.to_string(),
                                    c.actual.clone().unwrap_or_default(),
                                ]
                            })
                            .collect(),
                    )
                },
            );
            let bad = checks.iter().filter(|c| !c.ok()).count();
            if bad > 0 {
                return Err(RegistryError::Corrupt(format!(
                    "{model} v{version}: {bad} of {} files do not match the manifest",
                    checks.len()
                )));
            }
        }
        Command::Archive { model, version } => {
            let refs = registry.archive(&model, version, by, reason).await?;
            out.print(&refs_json(&refs), || {
                format!("{model} v{version} archived (revision {})", refs.revision)
            });
        }
        Command::ImportTriton { dir } => {
            let imported = import_triton(&registry, &dir, by, &progress).await?;
            out.print(&Value::Array(imported.clone()), || {
                table(
                    &["MODEL", "TRITON VERSION", "REGISTRY VERSION"],
                    imported
                        .iter()
                        .map(|i| {
                            vec![
                                short(&i["model"]),
                                i["triton_version"].to_string(),
                                i["version"].to_string(),
                            ]
                        })
                        .collect(),
                )
            });
        }
    }
    Ok(())
}

/// Text or JSON, as asked.
struct Output {
    json: bool,
}

impl Output {
    fn print(&self, value: &Value, text: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON prints")
            );
        } else {
            println!("{}", text());
        }
    }
}

/// A progress bar on stderr, only when a person is watching.
struct BarProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl BarProgress {
    fn new(visible: bool) -> Self {
        let bar = visible.then(|| {
            let bar = indicatif::ProgressBar::hidden();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }
}

impl Progress for BarProgress {
    fn start(&self, file: &str, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.reset();
            bar.set_length(total);
            bar.set_message(file.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `key=value` pairs, as object-store options.
pub fn parse_options(options: &[String]) -> Result<Vec<(String, String)>, RegistryError> {
    options
        .iter()
        .map(|o| key_value("option", o).map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn key_value<'a>(what: &str, text: &'a str) -> Result<(&'a str, &'a str), RegistryError> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| RegistryError::Invalid(format!("{what} '{text}' must look like name=value")))
}

fn read(path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path)
        .map_err(|e| RegistryError::Io(format!("cannot read {}: {e}", path.display())))
}

/// A Triton configuration from a config.pbtxt or its JSON form, as manifest JSON.
fn config_file(path: &Path) -> Result<Value, RegistryError> {
    let text = String::from_utf8(read(path)?)
        .map_err(|_| RegistryError::Invalid(format!("{} is not UTF-8 text", path.display())))?;
    let config = if text.trim_start().starts_with('{') {
        marquee_proto::parse_config_json(&text)
    } else {
        marquee_proto::parse_config_text(&text)
    }
    .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(marquee_proto::config_to_compact_json(&config))
}

async fn push_version(
    registry: &Registry,
    push: PushArgs,
    by: &str,
    progress: &dyn Progress,
) -> Result<Manifest, RegistryError> {
    let contents = Bytes::from(read(&push.file)?);
    let framework = match push.file.extension().and_then(|e| e.to_str()) {
        Some("onnx") => "onnx",
        Some("pt") | Some("pth") => "torchscript",
        _ => {
            return Err(RegistryError::Invalid(format!(
                "{}: the artifact must be .onnx (ONNX) or .pt (TorchScript)",
                push.file.display()
            )));
        }
    };
    // Start from the manifest file, if any; the registry fills name, version and files.
    let mut fields = match &push.manifest {
        Some(path) => serde_json::from_slice::<serde_json::Map<String, Value>>(&read(path)?)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?,
        None => serde_json::Map::new(),
    };
    for reserved in [
        "schema_version",
        "name",
        "version",
        "files",
        "created_at",
        "created_by",
        "framework",
    ] {
        if fields.remove(reserved).is_some() {
            return Err(RegistryError::Invalid(format!(
                "the manifest file sets '{reserved}', which the registry fills itself"
            )));
        }
    }
    fields.insert("schema_version".into(), json!(SCHEMA_VERSION));
    fields.insert("name".into(), json!(push.model));
    fields.insert("version".into(), json!(0));
    fields.insert("framework".into(), json!(framework));
    fields.insert("created_at".into(), json!(crate::now()));
    fields.insert("created_by".into(), json!(by));
    fields.insert("files".into(), json!([]));
    if !fields.contains_key("signature") {
        if framework != "onnx" {
            return Err(RegistryError::Invalid(
                "a TorchScript model needs its signature in --manifest (inputs and outputs with datatype and shape)".into(),
            ));
        }
        let signature = crate::onnx::signature(&contents)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", push.file.display())))?;
        fields.insert(
            "signature".into(),
            serde_json::to_value(signature).expect("signature serializes"),
        );
    }
    let mut manifest: Manifest = serde_json::from_value(Value::Object(fields))
        .map_err(|e| RegistryError::Invalid(format!("manifest: {e}")))?;
    if let Some(path) = &push.config {
        manifest.config = config_file(path)?;
    }
    if !manifest.config.is_null() {
        marquee_proto::parse_config_json(&manifest.config.to_string())
            .map_err(|e| RegistryError::Invalid(format!("serving configuration: {e}")))?;
    }
    for metric in &push.metrics {
        let (name, value) = key_value("metric", metric)?;
        let value = value.parse().map_err(|_| {
            RegistryError::Invalid(format!("metric '{metric}': '{value}' is not a number"))
        })?;
        manifest.metrics.insert(name.to_string(), value);
    }
    for gate in &push.gates {
        manifest
            .gates
            .push(Gate::parse(gate).map_err(RegistryError::Invalid)?);
    }
    for tag in &push.tags {
        let (k, v) = key_value("tag", tag)?;
        manifest.tags.insert(k.to_string(), v.to_string());
    }
    let lineage: &mut Lineage = &mut manifest.lineage;
    if let Some(dataset) = push.dataset {
        lineage.dataset_uri = dataset;
    }
    if let Some(code) = push.code_version {
        lineage.code_version = code;
    }
    for param in &push.params {
        let (k, v) = key_value("param", param)?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        lineage.parameters.insert(k.to_string(), value);
    }
    if !push.description.is_empty() {
        manifest.description = push.description;
    }
    // Stored under the name serving looks for (Triton's default, or the config's own), whatever
    // the local file is called.
    let file_name = manifest
        .config
        .get("default_model_filename")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .unwrap_or(if framework == "onnx" {
            "model.onnx"
        } else {
            "model.pt"
        })
        .to_string();
    registry
        .push(
            &push.model,
            vec![PushFile {
                path: file_name,
                contents,
            }],
            manifest,
            progress,
        )
        .await
}

async fn import_triton(
    registry: &Registry,
    dir: &str,
    by: &str,
    progress: &dyn Progress,
) -> Result<Vec<Value>, RegistryError> {
    let repository = ModelRepository::open(dir)?;
    let root = Path::new(dir);
    let mut imported = Vec::new();
    for name in repository.model_names().await? {
        let source = repository.model(&name).await?;
        let mut config = source.config.clone().unwrap_or_default();
        config.name.clear();
        // TorchScript by Triton's PyTorch-backend names (or a .pt file); ONNX otherwise.
        let torchscript = config.platform == "pytorch_libtorch"
            || config.backend == "pytorch"
            || config.default_model_filename.ends_with(".pt");
        let filename = match (config.default_model_filename.is_empty(), torchscript) {
            (false, _) => config.default_model_filename.clone(),
            (true, true) => "model.pt".to_string(),
            (true, false) => "model.onnx".to_string(),
        };
        for triton_version in &source.versions {
            let version_dir = root.join(&name).join(triton_version.to_string());
            let mut files = Vec::new();
            for path in walk(&version_dir)? {
                let relative = path
                    .strip_prefix(&version_dir)
                    .expect("walked below the version folder")
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push(PushFile {
                    path: relative,
                    contents: Bytes::from(read(&path)?),
                });
            }
            let artifact = files.iter().find(|f| f.path == filename).ok_or_else(|| {
                RegistryError::Invalid(format!("{name}/{triton_version}: no {filename} to import"))
            })?;
            // A TorchScript file has no signature to read: its configuration declares it.
            let signature = if torchscript {
                Default::default()
            } else {
                crate::onnx::signature(&artifact.contents).map_err(|e| {
                    RegistryError::Invalid(format!("{name}/{triton_version}/{filename}: {e}"))
                })?
            };
            let mut tags = BTreeMap::new();
            tags.insert("triton_version".to_string(), triton_version.to_string());
            let manifest = Manifest {
                schema_version: SCHEMA_VERSION,
                name: name.clone(),
                version: 0,
                framework: if torchscript { "torchscript" } else { "onnx" }.into(),
                created_at: crate::now(),
                created_by: by.to_string(),
                description: format!("imported from the Triton repository {dir}"),
                files: Vec::new(),
                signature,
                config: marquee_proto::config_to_compact_json(&config),
                metrics: BTreeMap::new(),
                gates: Vec::new(),
                tags,
                lineage: Lineage::default(),
                pipeline: source.pipeline.clone().unwrap_or_default(),
                drift_baseline: Value::Null,
            };
            let pushed = registry.push(&name, files, manifest, progress).await?;
            imported.push(
                json!({"model": name, "triton_version": triton_version, "version": pushed.version}),
            );
        }
    }
    Ok(imported)
}

/// Every file below `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .map_err(|e| RegistryError::Io(format!("{}: {e}", current.display())))?;
        for entry in entries {
            let path = entry.map_err(|e| RegistryError::Io(e.to_string()))?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn manifest_json(manifest: &Manifest, refs: Option<&Refs>) -> Value {
    let mut value = serde_json::to_value(manifest).expect("a manifest serializes");
    if let (Some(refs), Value::Object(map)) = (refs, &mut value) {
        let stage = if refs.archived.contains(&manifest.version) {
            "archived"
        } else {
            refs.stage(manifest.version).name()
        };
        map.insert("stage".into(), json!(stage));
        map.insert("aliases".into(), json!(refs.aliases_of(manifest.version)));
        if let Some(record) = refs.stages.get(&manifest.version) {
            map.insert("approved_by".into(), json!(record.approved_by));
        }
    }
    value
}

fn refs_json(refs: &Refs) -> Value {
    serde_json::to_value(refs).expect("refs serialize")
}

/// Fields that differ between two manifests, with metric deltas.
fn diff(a: &Manifest, b: &Manifest) -> Vec<Value> {
    let mut out = Vec::new();
    let mut compare = |field: &str, x: Value, y: Value| {
        if x != y {
            let change = match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) => format!("{:+}", q - p),
                _ if x.is_null() => "added".to_string(),
                _ if y.is_null() => "removed".to_string(),
                _ => "changed".to_string(),
            };
            out.push(json!({"field": field, "a": x, "b": y, "change": change}));
        }
    };
    let files = |m: &Manifest| {
        json!(
            m.files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect::<BTreeMap<_, _>>()
        )
    };
    compare("files", files(a), files(b));
    compare("framework", json!(a.framework), json!(b.framework));
    compare("signature", json!(a.signature), json!(b.signature));
    compare("config", a.config.clone(), b.config.clone());
    let names: std::collections::BTreeSet<&String> =
        a.metrics.keys().chain(b.metrics.keys()).collect();
    for name in names {
        compare(
            &format!("metrics.{name}"),
            json!(a.metrics.get(name)),
            json!(b.metrics.get(name)),
        );
    }
    compare("gates", json!(a.gates), json!(b.gates));
    compare("tags", json!(a.tags), json!(b.tags));
    compare("lineage", json!(a.lineage), json!(b.lineage));
    compare("pipeline", a.pipeline.clone(), b.pipeline.clone());
    out
}

/// Rows under headers, columns padded to their widest cell: the CLIs' human output.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut text = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    text.extend(rows.into_iter().map(line));
    text.join("\n")
}

fn files_summary(manifest: &Manifest) -> String {
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    format!("{} file(s), {bytes} bytes", manifest.files.len())
}

fn join_strings(values: &[Value]) -> String {
    values
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn aliases_text(aliases: &Value) -> String {
    aliases
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}=v{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn metrics_text(metrics: &Value) -> String {
    metrics
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn short(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(39).collect::<String>())
    } else {
        text
    }
}
