//! The `marquee` binary: parses the command line and wires the library crates together.

use anyhow::Context;
use clap::{Parser, Subcommand};
use marquee_serving::{ServeConfig, Server};

#[derive(Parser)]
#[command(
    name = "marquee",
    version,
    about = "Marquee: ML model serving for the movie-ticket platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over KServe v2 REST (8000), gRPC (8001) and metrics (8002).
    Serve(ServeConfig),
    /// Push, inspect and promote models in the model registry.
    Registry(marquee_registry::cli::RegistryArgs),
    /// Check feature definitions, materialise features, build training sets, look values up.
    Features(marquee_feature_store::cli::FeaturesArgs),
    /// Generate the movie-ticket platform's data (tables, feature histories, labels) from a seed.
    Data(marquee_training_jobs::cli::DataArgs),
    /// Train a hosted model on a generated world and push it to the registry.
    Train(marquee_training_jobs::cli::TrainArgs),
}

/// mimalloc instead of the C library's allocator: requests allocate and free many small buffers
/// across threads, where glibc's malloc spent about a tenth of the server's CPU (bench/compare.py).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Says at start-up which scheduler serves requests, so a build that lost `--cfg tokio_unstable`
/// (a `RUSTFLAGS` variable replaces `.cargo/config.toml`'s flags) and answers a batch in one write
/// per request shows in the log instead of only as lost throughput.
fn log_scheduler(runtime: &tokio::runtime::Runtime) {
    if runtime.handle().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        tracing::info!("async runtime: one thread, tasks run in the order woken");
        return;
    }
    // As the runtime counts them (tokio's default also reads TOKIO_WORKER_THREADS).
    let workers = runtime.metrics().num_workers();
    if cfg!(tokio_unstable) {
        tracing::info!(workers, "async runtime: multi-threaded, LIFO slot off");
    } else {
        tracing::warn!(
            workers,
            "async runtime: multi-threaded with tokio's LIFO slot (built without \
             `--cfg tokio_unstable`): a batch's answers leave a connection one write each"
        );
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MARQUEE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let worker_threads = match &cli.command {
        Command::Serve(config) => config.worker_threads,
        _ => 0,
    };
    // One thread: tokio's single-threaded scheduler, which runs woken tasks in order and has no
    // work stealing to pay for (the least CPU per inference).
    let mut runtime = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            builder.worker_threads(worker_threads);
        }
        // The multi-threaded scheduler runs the task woken last first (its LIFO slot): a
        // connection's task woken by one answer of a batch would write it before the next answer
        // is ready, one write each. Without the slot woken tasks run in order and the batch leaves
        // in one write. The setting is tokio-unstable: `.cargo/config.toml` builds with
        // `--cfg tokio_unstable`.
        #[cfg(tokio_unstable)]
        builder.disable_lifo_slot();
        builder
    };
    runtime.enable_all();
    let runtime = runtime.build().context("cannot start the async runtime")?;
    if matches!(cli.command, Command::Serve(_)) {
        log_scheduler(&runtime);
    }
    runtime.block_on(async {
        match cli.command {
            Command::Serve(config) => serve(config).await,
            Command::Registry(args) => {
                exit_on_error(marquee_registry::cli::run(args).await, |e| e.exit_code())
            }
            Command::Features(args) => {
                exit_on_error(marquee_feature_store::cli::run(args).await, |e| {
                    e.exit_code()
                })
            }
            Command::Data(args) => {
                exit_on_error(marquee_training_jobs::cli::run(args).await, |e| {
                    e.exit_code()
                })
            }
            Command::Train(args) => {
                exit_on_error(marquee_training_jobs::cli::train(args).await, |e| {
                    e.exit_code()
                })
            }
        }
    })
}

/// A subcommand's failure: its message on stderr and its crate's exit code.
fn exit_on_error<E: std::fmt::Display>(
    result: Result<(), E>,
    exit_code: impl Fn(&E) -> i32,
) -> anyhow::Result<()> {
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(exit_code(&e));
    }
    Ok(())
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let server = Server::start(&config)
        .await
        .context("marquee serve could not start")?;
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
