//! `mamba`: generate, score, inspect, benchmark, train and measure the scaling of Mamba
//! models from the command line.
//!
//! Every failure ends the process with exit code 1 and one `error: ...` line on stderr.

mod args;
mod bench;
mod convert;
mod generate;
mod info;
mod init;
mod loading;
mod memory;
mod scaling;
mod score;
mod train;

use anyhow::{Context, Result};
use args::{Cli, Command};
use clap::error::ErrorKind;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keep_backtraces_out_of_errors();
    memory::keep_freed_memory_for_reuse();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return command_line_failure(err),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    configure_threads(cli.threads)?;
    mamba_ops::pages::set_huge_pages(cli.huge_pages);
    match cli.command {
        Command::Generate(args) => generate::run(&args, cli.json),
        Command::Score(args) => score::run(&args, cli.json),
        Command::Info(args) => info::run(&args, cli.json),
        Command::Bench(args) => bench::run(&args, cli.json),
        Command::Init(args) => init::run(&args, cli.json),
        Command::Train(args) => train::run(&args, cli.json),
        Command::Scaling(args) => scaling::run(&args, cli.threads, cli.json),
        Command::Convert(args) => convert::run(&args, cli.json),
    }
}

/// Candle attaches a backtrace to its errors, and prints it as part of their message,
/// whenever backtraces are enabled (`RUST_BACKTRACE=1` does that); error messages stay
/// one line by turning library backtraces off unless `RUST_LIB_BACKTRACE` asks for them.
/// Panic backtraces still follow `RUST_BACKTRACE`. Runs before any thread starts.
fn keep_backtraces_out_of_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// How long candle's quantised-product workers spin for the next product before they sleep,
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. candle's default, 25 000 pauses,
/// keeps a core busy through our own threaded phases (SSD, conv, norms, f32 products) between
/// two of its products: mamba2-130m / mamba-130m q4_0 and q8_0 prefill at 2 threads ran 8-20 %
/// faster with 200 (BENCHMARKS.md).
const CANDLE_SPIN_LIMIT: &str = "200";

/// Sizes rayon's global pool and sets `RAYON_NUM_THREADS`, which candle's CPU matrix
/// products read, and candle's spin limit ([`CANDLE_SPIN_LIMIT`]); must run before any candle
/// call. `None` keeps the default number of threads (all cores).
fn configure_threads(threads: Option<usize>) -> Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    let Some(threads) = threads else {
        return Ok(());
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("cannot set up the thread pool")
}

/// Help and version go to stdout as usual; a usage error becomes one `error:` line (its
/// first paragraph) and exit code 1.
fn command_line_failure(err: clap::Error) -> ExitCode {
    if !err.use_stderr() {
        // Printing help or the version; nothing to do if stdout is gone.
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let message = if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "error: no command given: see 'mamba --help'".to_string()
    } else {
        let rendered = err.render().to_string();
        one_line(rendered.split("\n\n").next().unwrap_or_default())
    };
    eprintln!("{message}");
    ExitCode::FAILURE
}

/// The error and its causes joined by ": " on one line. A cause whose text its parent
/// already shows (errors that print their source in their own message) is left out.
fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    one_line(&line)
}

/// `text` with its lines trimmed and joined by spaces.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
