//! `marquee features`: check definitions, materialise views into the online store, build
//! point-in-time training sets, and look values up as serving would. Human output by default,
//! `--json` for scripts; exit codes from [`FeatureStoreError::exit_code`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema};
use clap::{Args, Subcommand};
use marquee_registry::cli::{parse_options, table};
use serde_json::{Value, json};

use crate::definitions::{Definitions, FeatureView};
use crate::offline::{StorePath, parse_time_ms};
use crate::online::{Lookup, entity_key, now_ms, open_online};
use crate::redis_store::DEFAULT_TIMEOUT_MS;
use crate::{FeatureStoreError, jobs};

/// `marquee features …`
#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// The definitions file (TOML: entities and feature views).
    #[arg(
        long,
        env = "MARQUEE_FEATURES",
        global = true,
        default_value = "features.toml"
    )]
    pub definitions: PathBuf,
    /// Online store: `memory` (in-process; lost when the command ends) or `redis://host:port/db`.
    #[arg(
        long,
        env = "MARQUEE_ONLINE_STORE",
        global = true,
        default_value = "memory"
    )]
    pub online: String,
    /// Object-store option for offline sources on S3/GCS, `key=value` (repeatable).
    #[arg(long = "store-option", global = true)]
    pub store_options: Vec<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the definitions and show what they declare.
    Apply,
    /// Copy the latest offline values into the online store, from each view's watermark on.
    Materialize {
        /// Views to materialise (default: every view with an offline source).
        #[arg(long = "view")]
        views: Vec<String>,
        /// Exclusive start, RFC 3339 or ms (default: the view's watermark; all history without).
        #[arg(long)]
        start: Option<String>,
        /// Inclusive end, RFC 3339 or ms (default: now).
        #[arg(long)]
        end: Option<String>,
    },
    /// Build a point-in-time-correct training set from entity rows.
    Dataset {
        /// Entity rows: Parquet or CSV with the join keys and an event time per row.
        #[arg(long)]
        entities: PathBuf,
        /// Features, `view:feature` or `view` for all of a view's (repeatable, or comma-separated).
        #[arg(long = "features", required = true)]
        features: Vec<String>,
        /// The entity rows' event-time column.
        #[arg(long, default_value = "event_timestamp")]
        timestamp_column: String,
        /// Where to write the training set (Parquet).
        #[arg(long)]
        output: PathBuf,
    },
    /// Look up one entity's values in the online store, as serving would.
    Get {
        /// The feature view.
        view: String,
        /// The entity: `join_key=value` per join key of the view.
        keys: Vec<String>,
    },
}

/// Runs one command, printing its result.
pub async fn run(args: FeaturesArgs) -> Result<(), FeatureStoreError> {
    let definitions = Definitions::load(&args.definitions)?;
    let base = args
        .definitions
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let options = parse_options(&args.store_options)
        .map_err(|e| FeatureStoreError::Definitions(format!("--store-option: {e}")))?;
    let source_of = |view: &FeatureView| -> Result<StorePath, FeatureStoreError> {
        let source = view.source.as_ref().ok_or_else(|| {
            FeatureStoreError::Offline(format!(
                "feature view '{}' has no offline source",
                view.name
            ))
        })?;
        StorePath::open(&source.path, &base, &options)
    };
    let print = |value: Value, text: String| {
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("JSON prints")
            );
        } else {
            println!("{text}");
        }
    };
    match &args.command {
        Command::Apply => {
            let views: Vec<Value> = definitions
                .views()
                .map(|v| {
                    json!({
                        "name": v.name,
                        "entities": v.entities,
                        "ttl": humantime::format_duration(v.ttl).to_string(),
                        "features": v.features.iter().map(|f| json!({"name": f.name, "dtype": f.dtype.name(), "default": f.default.to_json()})).collect::<Vec<_>>(),
                        "source": v.source.as_ref().map(|s| s.path.clone()),
                    })
                })
                .collect();
            let entities: Vec<Value> = definitions
                .entities()
                .map(|e| json!({"name": e.name, "join_key": e.join_key}))
                .collect();
            let rows = definitions
                .views()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.join_keys.join(", "),
                        humantime::format_duration(v.ttl).to_string(),
                        v.features
                            .iter()
                            .map(|f| format!("{}:{}", f.name, f.dtype.name()))
                            .collect::<Vec<_>>()
                            .join(" "),
                        v.source.as_ref().map_or("-".into(), |s| s.path.clone()),
                    ]
                })
                .collect();
            print(
                json!({"entities": entities, "feature_views": views}),
                format!(
                    "{} valid: {} entities, {} feature views\n{}",
                    args.definitions.display(),
                    entities.len(),
                    views.len(),
                    table(&["VIEW", "KEYS", "TTL", "FEATURES", "SOURCE"], rows)
                ),
            );
        }
        Command::Materialize { views, start, end } => {
            let online = open_online(&args.online, DEFAULT_TIMEOUT_MS)?;
            let start = start.as_deref().map(parse_time).transpose()?;
            let end = end
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or_else(now_ms);
            let chosen: Vec<&FeatureView> = if views.is_empty() {
                definitions.views().filter(|v| v.source.is_some()).collect()
            } else {
                views
                    .iter()
                    .map(|v| definitions.view(v))
                    .collect::<Result<_, _>>()?
            };
            let bar = progress_bar(!args.json && std::io::stderr().is_terminal());
            let mut reports = Vec::new();
            for view in chosen {
                bar.set_message(view.name.clone());
                let report = jobs::materialize(
                    view,
                    &source_of(view)?,
                    online.as_ref(),
                    start,
                    end,
                    &|done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    },
                )
                .await?;
                reports.push(report);
            }
            bar.finish_and_clear();
            let rows = reports
                .iter()
                .map(|r| {
                    vec![
                        r.view.clone(),
                        r.start_ms.map_or("(all history)".into(), |s| s.to_string()),
                        r.end_ms.to_string(),
                        r.history_rows.to_string(),
                        r.entities_written.to_string(),
                    ]
                })
                .collect();
            print(
                serde_json::to_value(&reports).expect("reports serialize"),
                table(
                    &[
                        "VIEW",
                        "AFTER (ms)",
                        "UNTIL (ms)",
                        "ROWS READ",
                        "ENTITIES WRITTEN",
                    ],
                    rows,
                ),
            );
        }
        Command::Dataset {
            entities,
            features,
            timestamp_column,
            output,
        } => {
            let asked = jobs::parse_feature_refs(&definitions, features)?;
            let rows = read_entity_rows(entities).await?;
            let set = jobs::training_set(&rows, timestamp_column, &asked, source_of).await?;
            let bytes = jobs::to_parquet(&set)?;
            std::fs::write(output, &bytes)
                .map_err(|e| FeatureStoreError::Offline(format!("{}: {e}", output.display())))?;
            print(
                json!({"output": output, "rows": set.num_rows(), "columns": set.schema().fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>()}),
                format!(
                    "{} rows x {} columns written to {}",
                    set.num_rows(),
                    set.num_columns(),
                    output.display()
                ),
            );
        }
        Command::Get { view, keys } => {
            let view = definitions.view(view)?;
            let key = entity_from_args(view, keys)?;
            let online = open_online(&args.online, DEFAULT_TIMEOUT_MS)?;
            let found = online
                .read(&[Lookup {
                    view,
                    entity_key: &key,
                }])
                .await?
                .pop()
                .flatten();
            let values: serde_json::Map<String, Value> = view
                .features
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let value = found.as_ref().and_then(|row| row.values[i].clone());
                    (f.name.clone(), value.map_or(Value::Null, |v| v.to_json()))
                })
                .collect();
            let event_time = found.as_ref().map(|r| r.event_time_ms);
            let rows = view
                .features
                .iter()
                .map(|f| {
                    vec![
                        f.name.clone(),
                        match &values[&f.name] {
                            Value::Null => format!("(none; default {})", f.default),
                            v => v.to_string(),
                        },
                    ]
                })
                .collect();
            print(
                json!({"view": view.name, "found": found.is_some(), "event_time_ms": event_time, "values": values}),
                format!(
                    "{}\n{}",
                    match event_time {
                        Some(t) => format!("found, event time {t} ms"),
                        None => "not in the online store (serving would use the defaults)".into(),
                    },
                    table(&["FEATURE", "VALUE"], rows)
                ),
            );
        }
    }
    Ok(())
}

fn parse_time(text: &str) -> Result<i64, FeatureStoreError> {
    parse_time_ms(text).map_err(FeatureStoreError::Definitions)
}

fn entity_from_args(view: &FeatureView, keys: &[String]) -> Result<String, FeatureStoreError> {
    let mut values = Vec::new();
    for join_key in &view.join_keys {
        let value = keys
            .iter()
            .filter_map(|k| k.split_once('='))
            .find(|(k, _)| k == join_key)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                FeatureStoreError::Definitions(format!(
                    "feature view '{}' needs {join_key}=VALUE",
                    view.name
                ))
            })?;
        values.push(value);
    }
    Ok(entity_key(&values))
}

/// Entity rows from Parquet or CSV (every CSV column read as text), as one batch.
async fn read_entity_rows(path: &Path) -> Result<RecordBatch, FeatureStoreError> {
    let bad = |e: String| FeatureStoreError::Offline(format!("{}: {e}", path.display()));
    let batches = match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => {
            let location = path.to_str().ok_or_else(|| bad("is not UTF-8".into()))?;
            StorePath::open(location, Path::new(""), &[])?
                .batches(None)
                .await?
        }
        Some("csv") => {
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let header = text.lines().next().ok_or_else(|| bad("is empty".into()))?;
            let schema = Arc::new(Schema::new(
                header
                    .split(',')
                    .map(|name| Field::new(name.trim(), DataType::Utf8, true))
                    .collect::<Vec<_>>(),
            ));
            arrow_csv::ReaderBuilder::new(schema)
                .with_header(true)
                .build(std::io::Cursor::new(text.as_bytes()))
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?
        }
        _ => return Err(bad("entity rows must be a .parquet or .csv file".into())),
    };
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| bad("holds no rows".into()))?;
    arrow_select::concat::concat_batches(&schema, &batches).map_err(|e| bad(e.to_string()))
}

fn progress_bar(visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:20} [{bar:30}] {pos}/{len} entities")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
