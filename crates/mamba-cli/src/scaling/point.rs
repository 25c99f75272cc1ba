//! One point of a sweep: a `mamba bench` process of this same binary, watched until it
//! ends, runs over the time limit or uses more memory than the budget.

use super::{Point, Record, Subject, Sweep};
use crate::args::ScalingArgs;
use crate::memory::rss_bytes;
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How often a running point's memory and time are checked.
const POLL: Duration = Duration::from_millis(20);

/// What one point may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub seconds: f64,
    pub rss_bytes: u64,
}

/// What `mamba bench` measured at one point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    pub parameters: u64,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ms_per_decode_step: f64,
    pub peak_rss_bytes: u64,
    /// On a GPU, the most device memory held at once.
    pub peak_device_bytes: Option<u64>,
}

/// How a point ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Measured(Measured),
    /// Stopped at, or finished after, the time limit.
    TimedOut,
    /// Stopped, or finished, above the memory budget, having used this much.
    OverBudget {
        rss_bytes: u64,
    },
    /// The process failed, with its error line.
    Failed(String),
    /// Not run, for this reason.
    Skipped(String),
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Measured(_) => "ok",
            Outcome::TimedOut => "timeout",
            Outcome::OverBudget { .. } => "over_budget",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped(_) => "skipped",
        }
    }

    pub fn is_measured(&self) -> bool {
        matches!(self, Outcome::Measured(_))
    }

    pub fn measured(&self) -> Option<&Measured> {
        match self {
            Outcome::Measured(m) => Some(m),
            _ => None,
        }
    }

    /// Why a point has no measurement, in words (empty for measured points).
    pub fn note(&self) -> String {
        match self {
            Outcome::Measured(_) => String::new(),
            Outcome::TimedOut => "over the time limit".into(),
            Outcome::OverBudget { rss_bytes } => {
                format!("used {} MiB, over the memory budget", rss_bytes >> 20)
            }
            Outcome::Failed(error) | Outcome::Skipped(error) => error.clone(),
        }
    }
}

/// Runs `point` of `subject` as a `mamba bench` process under `limits`.
pub fn run_point(
    args: &ScalingArgs,
    threads: Option<usize>,
    subject: &Subject,
    point: &Point,
    limits: &Limits,
) -> Result<Record> {
    let start = Instant::now();
    let child = Command::new(std::env::current_exe().context("cannot find the mamba binary")?)
        .args(bench_args(args, threads, subject, point))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start mamba bench")?;
    let outcome = watch(child, limits)?;
    Ok(Record {
        point: *point,
        outcome,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The `mamba bench` command line of a point.
fn bench_args(
    args: &ScalingArgs,
    threads: Option<usize>,
    subject: &Subject,
    point: &Point,
) -> Vec<String> {
    let mut line: Vec<String> = vec!["bench".into()];
    line.extend(subject.bench_args.iter().cloned());
    for (flag, value) in [
        ("--prompt-len", point.prompt_len),
        ("--gen-len", args.gen_len),
        ("--batch", point.batch),
        ("--chunk-size", args.chunk.chunk_size),
    ] {
        line.extend([flag.to_string(), value.to_string()]);
    }
    line.extend(["--device".to_string(), args.device.as_arg()]);
    if point.sweep == Sweep::Batch {
        line.push("--shared-prompt".into());
    }
    if let Some(t) = threads {
        line.extend(["--threads".to_string(), t.to_string()]);
    }
    line.push("--json".into());
    line
}

/// Waits for `child`, stopping it when it runs over the time limit or the memory budget,
/// and reads what it measured. A point that ended between two checks but over a limit
/// counts as stopped all the same.
fn watch(mut child: Child, limits: &Limits) -> Result<Outcome> {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let rss = rss_bytes(child.id()).unwrap_or(0);
        let stopped = if rss > limits.rss_bytes {
            Some(Outcome::OverBudget { rss_bytes: rss })
        } else if start.elapsed().as_secs_f64() > limits.seconds {
            Some(Outcome::TimedOut)
        } else {
            None
        };
        if let Some(outcome) = stopped {
            child.kill()?;
            child.wait()?;
            return Ok(outcome);
        }
        std::thread::sleep(POLL);
    };
    let stdout = read_all(child.stdout.take())?;
    if !status.success() {
        let error = read_all(child.stderr.take())?;
        let line = error.lines().last().unwrap_or("").trim();
        return Ok(Outcome::Failed(if line.is_empty() {
            format!("mamba bench ended with {status}")
        } else {
            line.to_string()
        }));
    }
    Ok(match parse_report(&stdout) {
        Some(m) if m.peak_rss_bytes > limits.rss_bytes => Outcome::OverBudget {
            rss_bytes: m.peak_rss_bytes,
        },
        Some(_) if start.elapsed().as_secs_f64() > limits.seconds => Outcome::TimedOut,
        Some(m) => Outcome::Measured(m),
        None => Outcome::Failed(format!("unexpected output from mamba bench: {stdout:?}")),
    })
}

fn read_all(pipe: Option<impl Read>) -> Result<String> {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_string(&mut text)?;
    }
    Ok(text)
}

/// The measurements in `mamba bench --json`'s output line.
fn parse_report(stdout: &str) -> Option<Measured> {
    let report: Value = serde_json::from_str(stdout.lines().last()?).ok()?;
    let number = |key: &str| report[key].as_f64();
    Some(Measured {
        parameters: report["parameters"].as_u64()?,
        prefill_seconds: number("prefill_seconds")?,
        prefill_tokens_per_s: number("prefill_tokens_per_s")?,
        decode_tokens_per_s: number("decode_tokens_per_s")?,
        ms_per_decode_step: number("ms_per_decode_step")?,
        peak_rss_bytes: report["peak_rss_bytes"].as_u64()?,
        peak_device_bytes: report["peak_device_bytes"].as_u64(),
    })
}
