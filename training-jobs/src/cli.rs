//! `marquee data`: generate the movie-ticket platform's world and write it to the offline store
//! (tables, feature histories, definitions, labels). Progress on a terminal, a summary table or
//! `--json` at the end.

use std::io::IsTerminal;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::TrainingError;
use crate::data::{Scale, World, write};

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
