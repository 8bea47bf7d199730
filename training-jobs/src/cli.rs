//! `marquee data` (generate the movie-ticket platform's world and write it to the offline store:
//! tables, feature histories, definitions, labels) and `marquee train` (fit a hosted model on such
//! a world, measure it through the serving backend, gate it on its fallback, register it).
//! Progress on a terminal, a summary or `--json` at the end.

use std::io::IsTerminal;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::TrainingError;
use crate::data::{Scale, World, write};
use crate::train::{self, TrainOptions};

/// `marquee data …`
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a world (users, movies, theaters, shows, bookings, payments, fraud) from a seed
    /// and write it, with its feature definitions, to a folder or object store.
    Generate {
        /// How big: small (seconds, tests), medium (the quick start), large (benchmarks).
        #[arg(long, value_enum, default_value_t = Scale::Medium)]
        scale: Scale,
        /// The same seed gives the same world.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write: a folder, `s3://bucket/prefix` or `gs://bucket/prefix`.
        #[arg(long)]
        out: String,
        /// Object-store option for S3/GCS, `key=value` (repeatable).
        #[arg(long = "store-option")]
        store_options: Vec<String>,
    },
}

pub async fn run(args: DataArgs) -> Result<(), TrainingError> {
    match args.command {
        Command::Generate {
            scale,
            seed,
            out,
            store_options,
        } => {
            let options = marquee_registry::cli::parse_options(&store_options)
                .map_err(|e| TrainingError::Invalid(e.to_string()))?;
            let started = Instant::now();
            let bar = progress_bar(!args.json && std::io::stderr().is_terminal());
            let mut stage = |name: &str| bar.set_message(name.to_string());
            let world = World::generate(scale, seed, &mut stage);
            let manifest = write::write(&world, &out, &options, &mut stage).await?;
            bar.finish_and_clear();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"out": out, "seconds": started.elapsed().as_secs_f64(), "manifest": manifest})
                );
            } else {
                println!(
                    "generated the {scale} world (seed {seed}) in {:.1} s into {out}",
                    started.elapsed().as_secs_f64()
                );
                for (file, rows) in &manifest.rows {
                    println!("  {file:36} {rows:>10} rows");
                }
                println!("  features.toml                        the feature definitions");
            }
            Ok(())
        }
    }
}

fn progress_bar(visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// `marquee train …`
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(value_enum)]
    pub model: TrainedModel,
    /// A world written by `marquee data generate` (folder, `s3://…`, `gs://…`).
    #[arg(long, env = "MARQUEE_DATA")]
    pub data: String,
    /// The registry to push to.
    #[arg(long, env = "MARQUEE_REGISTRY")]
    pub registry: String,
    /// Seeds the fit: the same seed and data give the same model.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Scratch folder for the training set and the exported artifact (default: a temporary one).
    #[arg(long)]
    pub work: Option<std::path::PathBuf>,
    /// The Python with the trainers' libraries (default: `.marquee/venv` of this checkout).
    #[arg(long, env = "MARQUEE_PYTHON")]
    pub python: Option<std::path::PathBuf>,
    /// `libonnxruntime.so` (default: as `marquee serve` finds it).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<std::path::PathBuf>,
    /// Train only models the registry holds no version of (a second run trains nothing).
    #[arg(long)]
    pub missing_only: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainedModel {
    /// Every hosted model, in the order they need each other: embedding, movie-index, fraud,
    /// pricing, recommendation. A job that fails does not stop the others; the exit status is
    /// the first failure's.
    All,
    /// The booking fraud score.
    Fraud,
    /// Text embedding (MiniLM int8 with its tokenizer), measured against its fp32 weights.
    Embedding,
    /// Movie search (`movie_search`): the descriptions embedded by the registry's `embedding`
    /// as an index, measured on the labelled queries against keyword search.
    MovieIndex,
    /// Ticket prices: a LightGBM demand model searched over candidate prices within the
    /// constraints, measured in the world's demand curve against the rule table.
    Pricing,
    /// Movies for a user: collaborative retrieval through an HNSW index and a LambdaRank
    /// ranker, measured leave-last-out against popularity.
    Recommendation,
}

impl TrainedModel {
    const EVERY: [TrainedModel; 5] = [
        TrainedModel::Embedding,
        TrainedModel::MovieIndex,
        TrainedModel::Fraud,
        TrainedModel::Pricing,
        TrainedModel::Recommendation,
    ];

    /// The registry model a job pushes.
    fn registered(self) -> &'static str {
        match self {
            TrainedModel::All => "all",
            TrainedModel::Fraud => "fraud",
            TrainedModel::Embedding => "embedding",
            TrainedModel::MovieIndex => "movie_search",
            TrainedModel::Pricing => "pricing",
            TrainedModel::Recommendation => "recommendation",
        }
    }

    async fn run(self, options: &TrainOptions) -> Result<train::Trained, TrainingError> {
        match self {
            TrainedModel::Fraud => train::fraud::train(options).await,
            TrainedModel::Embedding => train::embedding::train(options).await,
            TrainedModel::MovieIndex => train::movie_index::train(options).await,
            TrainedModel::Pricing => train::pricing::train(options).await,
            TrainedModel::Recommendation => train::recommendation::train(options).await,
            TrainedModel::All => Err(TrainingError::Invalid(
                "'all' is a list of jobs, not a job".into(),
            )),
        }
    }
}

pub async fn train(args: TrainArgs) -> Result<(), TrainingError> {
    // A temporary work folder lives until the job ends.
    let temporary;
    let work = match &args.work {
        Some(work) => work.clone(),
        None => {
            temporary = tempfile::tempdir().map_err(|e| TrainingError::Output(e.to_string()))?;
            temporary.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&work)
        .map_err(|e| TrainingError::Output(format!("{}: {e}", work.display())))?;
    let python = match args
        .python
        .clone()
        .or_else(|| marquee_serving::server::in_checkout("venv/bin/python"))
    {
        Some(python) => python,
        None => {
            return Err(TrainingError::Trainer(
                "no Python environment: run deploy/setup.sh (it makes .marquee/venv) or pass --python".into(),
            ));
        }
    };
    let onnxruntime = marquee_serving::server::locate_onnxruntime(args.ort_library.as_deref())
        .map_err(|e| TrainingError::Evaluation(e.to_string()))?;
    let options = TrainOptions {
        data: args.data.clone(),
        registry: args.registry.clone(),
        seed: args.seed,
        work,
        python,
        onnxruntime,
        by: std::env::var("USER").unwrap_or_else(|_| "marquee train".into()),
    };
    let jobs: Vec<TrainedModel> = match args.model {
        TrainedModel::All => TrainedModel::EVERY.to_vec(),
        one => vec![one],
    };
    let registry = marquee_registry::Registry::open(&options.registry)
        .map_err(|e| TrainingError::Registry(e.to_string()))?;
    let mut reports = Vec::with_capacity(jobs.len());
    let mut failed: Option<TrainingError> = None;
    for job in jobs {
        let model = job.registered();
        if args.missing_only {
            let versions = registry
                .versions(model)
                .await
                .map_err(|e| TrainingError::Registry(e.to_string()))?;
            if let Some(latest) = versions.last() {
                if args.json {
                    reports.push(serde_json::json!({"model": model, "skipped": format!("version {latest} is in the registry")}));
                } else {
                    println!("{model}: version {latest} is in the registry; not trained again");
                }
                continue;
            }
        }
        let started = Instant::now();
        // One job failing (a gate, say) does not stop the others; the first failure is the
        // exit status once all have run.
        let trained = match job.run(&options).await {
            Ok(trained) => trained,
            Err(e) if args.model == TrainedModel::All => {
                if args.json {
                    reports.push(serde_json::json!({"model": model, "error": e.to_string()}));
                } else {
                    eprintln!("{model}: {e}");
                }
                failed.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let seconds = started.elapsed().as_secs_f64();
        if args.json {
            reports.push(serde_json::json!({"trained": trained, "seconds": seconds}));
        } else {
            print_trained(&trained, &options.registry, seconds);
        }
    }
    if args.json {
        if args.model == TrainedModel::All {
            println!("{}", serde_json::json!({"jobs": reports}));
        } else if let Some(report) = reports.first() {
            println!("{report}");
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(())
}

fn print_trained(trained: &train::Trained, registry: &str, seconds: f64) {
    println!(
        "{} version {} pushed to {registry} in {seconds:.1} s",
        trained.model, trained.version
    );
    for (name, value) in &trained.metrics {
        println!("  {name:28} {value:.4}");
    }
    for (gate, held) in &trained.gates {
        println!("  gate {gate}: {}", if *held { "held" } else { "failed" });
    }
}
