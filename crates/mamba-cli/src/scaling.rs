//! `mamba scaling`: how prefill time, decoding speed and peak memory grow with the prompt
//! length and with the batch, for several models with random weights, written as a CSV
//! file, a JSON file and SVG plots.
//!
//! Two sweeps per model:
//!
//! - length: batch 1, prompts of `--min-len`, twice that, ... up to `--max-len` tokens
//!   (or the model's own `NAME@N`), prefilled in chunks, then a few decoding steps at
//!   that context;
//! - batch: 1, 2, 4, ... up to `--max-batch` sequences decoding after one prompt of
//!   `--batch-prompt-len` tokens whose state each of them copies.
//!
//! Every point is its own `mamba bench` process, so that its peak memory is its own and a
//! point that runs over `--point-timeout` or `--memory-budget` can be stopped; a model's
//! sweep ends at its first stopped point (longer prompts and larger batches need more),
//! and its length sweep also ends before a point predicted to run over the time limit.

mod plots;
mod point;
mod report;

use crate::args::{ScalingArgs, SweepTarget};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_models::config::{preset, Family, ModelConfig};
use point::{run_point, Limits, Outcome};
use std::path::Path;
use std::time::Instant;

/// The presets swept when neither `--preset` nor `--config` is given.
const DEFAULT_PRESETS: [&str; 3] = ["mamba-130m", "mamba2-130m", "transformer-130m"];

/// A model to sweep.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Its name in the results: the preset, or the config file's stem.
    pub name: String,
    pub family: Family,
    /// How `mamba bench` is told about it: `--preset NAME` or `--config FILE`.
    pub bench_args: [String; 2],
    /// The longest prompt of its length sweep.
    pub max_len: usize,
}

/// Which sweep a point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Batch 1, growing prompts.
    Length,
    /// One shared prompt, growing batches.
    Batch,
}

impl Sweep {
    pub fn name(self) -> &'static str {
        match self {
            Sweep::Length => "length",
            Sweep::Batch => "batch",
        }
    }
}

/// One point: a model at a prompt length and a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub subject: usize,
    pub sweep: Sweep,
    pub prompt_len: usize,
    pub batch: usize,
}

/// A point and how it went.
#[derive(Debug, Clone)]
pub struct Record {
    pub point: Point,
    pub outcome: Outcome,
    /// Seconds the point's process ran (0 for skipped points).
    pub wall_seconds: f64,
}

/// Everything a sweep produced, with the settings it ran under.
#[derive(Debug)]
pub struct Results<'a> {
    pub args: &'a ScalingArgs,
    pub threads: Option<usize>,
    pub subjects: Vec<Subject>,
    pub records: Vec<Record>,
    pub wall_seconds: f64,
}

pub fn run(args: &ScalingArgs, threads: Option<usize>, json: bool) -> Result<()> {
    let subjects = subjects(args)?;
    check_ranges(args, &subjects)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let start = Instant::now();
    let records = sweep(args, threads, &subjects)?;
    let results = Results {
        args,
        threads,
        subjects,
        records,
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    report::write_csv(&args.out.join("scaling.csv"), &results)?;
    let document = report::document(&results);
    report::write_json(&args.out.join("scaling.json"), &document)?;
    plots::draw_all(&args.out, &results)?;
    if json {
        println!("{document}");
    } else {
        print!("{}", report::tables(&results));
        println!(
            "wrote scaling.csv, scaling.json and the plots to {}",
            args.out.display()
        );
    }
    Ok(())
}

fn check_ranges(args: &ScalingArgs, subjects: &[Subject]) -> Result<()> {
    if let Some(s) = subjects.iter().find(|s| s.max_len < args.min_len) {
        bail!(
            "--min-len {} is above the longest prompt {} of {}",
            args.min_len,
            s.max_len,
            s.name
        );
    }
    Ok(())
}

/// The models named by `--preset` and `--config` (the default presets without either),
/// each checked to load as a configuration before anything runs.
fn subjects(args: &ScalingArgs) -> Result<Vec<Subject>> {
    let presets: Vec<SweepTarget> = if args.presets.is_empty() && args.configs.is_empty() {
        DEFAULT_PRESETS
            .iter()
            .map(|name| SweepTarget {
                model: name.to_string(),
                max_len: None,
            })
            .collect()
    } else {
        args.presets.clone()
    };
    let mut subjects = Vec::new();
    for target in presets {
        subjects.push(Subject {
            name: target.model.clone(),
            family: preset(&target.model)?.family(),
            bench_args: ["--preset".into(), target.model.clone()],
            max_len: target.max_len.unwrap_or(args.max_len),
        });
    }
    for target in &args.configs {
        let path = Path::new(&target.model);
        subjects.push(Subject {
            name: file_stem(path),
            family: ModelConfig::from_file(path)?.family(),
            bench_args: ["--config".into(), target.model.clone()],
            max_len: target.max_len.unwrap_or(args.max_len),
        });
    }
    Ok(subjects)
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// Prompt lengths of the length sweep: `min`, doubling, up to `max`.
pub fn lengths(min: usize, max: usize) -> Vec<usize> {
    std::iter::successors(Some(min), |&l| l.checked_mul(2))
        .take_while(|&l| l <= max)
        .collect()
}

/// Batches of the batch sweep: 1, doubling, up to `max`.
pub fn batches(max: usize) -> Vec<usize> {
    lengths(1, max)
}

/// Runs every point of both sweeps for each model in turn, with a progress bar.
fn sweep(args: &ScalingArgs, threads: Option<usize>, subjects: &[Subject]) -> Result<Vec<Record>> {
    let batches = batches(args.max_batch);
    let total: usize = subjects
        .iter()
        .map(|s| lengths(args.min_len, s.max_len).len() + batches.len())
        .sum();
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} points [{elapsed}] {msg}",
    )?);
    let limits = Limits {
        seconds: args.point_timeout,
        rss_bytes: (args.memory_budget * (1u64 << 30) as f64) as u64,
    };
    let mut records = Vec::new();
    for (s, subject) in subjects.iter().enumerate() {
        let length_points = lengths(args.min_len, subject.max_len)
            .into_iter()
            .map(|prompt_len| Point {
                subject: s,
                sweep: Sweep::Length,
                prompt_len,
                batch: 1,
            });
        let batch_points = batches.iter().map(|&batch| Point {
            subject: s,
            sweep: Sweep::Batch,
            prompt_len: args.batch_prompt_len,
            batch,
        });
        for points in [length_points.collect::<Vec<_>>(), batch_points.collect()] {
            let mut run = |point: &Point| {
                bar.set_message(format!(
                    "{}: {} x {} tokens",
                    subject.name, point.batch, point.prompt_len
                ));
                let record = run_point(args, threads, subject, point, &limits);
                bar.inc(1);
                record
            };
            records.extend(sweep_points(&points, &limits, &mut run)?);
        }
    }
    bar.finish_and_clear();
    Ok(records)
}

/// Runs `points` (of one model and one sweep, each needing more than the one before) in
/// order until one is stopped or predicted to run over the time limit; the rest are
/// recorded as skipped.
fn sweep_points(
    points: &[Point],
    limits: &Limits,
    run: &mut impl FnMut(&Point) -> Result<Record>,
) -> Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    for point in points {
        let walls: Vec<f64> = records.iter().map(|r| r.wall_seconds).collect();
        let skip = if records.iter().any(|r| !r.outcome.is_measured()) {
            Some("a smaller point was stopped".to_string())
        } else {
            predicted_seconds(point.sweep, &walls)
                .filter(|&p| p > limits.seconds)
                .map(|p| format!("predicted to take {p:.0} s"))
        };
        records.push(match skip {
            Some(reason) => Record {
                point: *point,
                outcome: Outcome::Skipped(reason),
                wall_seconds: 0.0,
            },
            None => run(point)?,
        });
    }
    Ok(records)
}

/// The time of the next point of a length sweep, where the last two points' times grew
/// by a factor `r`: the last time times `r` again (twice the tokens cost `r` times as
/// much). Batch sweeps are not predicted: their points grow slowly.
fn predicted_seconds(sweep: Sweep, walls: &[f64]) -> Option<f64> {
    match (sweep, walls) {
        (Sweep::Length, [.., before, last]) if *before > 0.0 => Some(last * last / before),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_double_up_to_the_maximum() {
        assert_eq!(lengths(1024, 5000), vec![1024, 2048, 4096]);
        assert_eq!(lengths(1024, 1024), vec![1024]);
        assert_eq!(batches(20), vec![1, 2, 4, 8, 16]);
        assert_eq!(lengths(1 << 10, 1 << 20).len(), 11);
    }

    #[test]
    fn prediction_extends_the_last_growth() {
        assert_eq!(predicted_seconds(Sweep::Length, &[2.0, 8.0]), Some(32.0));
        assert_eq!(predicted_seconds(Sweep::Length, &[8.0]), None);
        assert_eq!(predicted_seconds(Sweep::Batch, &[2.0, 8.0]), None);
    }

    fn point(prompt_len: usize) -> Point {
        Point {
            subject: 0,
            sweep: Sweep::Length,
            prompt_len,
            batch: 1,
        }
    }

    /// A fake run taking `wall(prompt_len)` seconds, stopped above `stop_from` tokens.
    fn fake_run(
        wall: impl Fn(usize) -> f64,
        stop_from: usize,
    ) -> impl FnMut(&Point) -> Result<Record> {
        move |p: &Point| {
            Ok(Record {
                point: *p,
                outcome: if p.prompt_len >= stop_from {
                    Outcome::TimedOut
                } else {
                    Outcome::Measured(Default::default())
                },
                wall_seconds: wall(p.prompt_len),
            })
        }
    }

    fn statuses(records: &[Record]) -> Vec<&'static str> {
        records.iter().map(|r| r.outcome.status()).collect()
    }

    #[test]
    fn a_stopped_point_ends_the_sweep() {
        let points: Vec<Point> = lengths(1, 16).into_iter().map(point).collect();
        let limits = Limits {
            seconds: 1e9,
            rss_bytes: u64::MAX,
        };
        let records = sweep_points(&points, &limits, &mut fake_run(|l| l as f64, 4)).unwrap();
        assert_eq!(
            statuses(&records),
            ["ok", "ok", "timeout", "skipped", "skipped"]
        );
    }

    #[test]
    fn a_point_predicted_to_run_too_long_is_skipped() {
        let points: Vec<Point> = lengths(1, 16).into_iter().map(point).collect();
        let limits = Limits {
            seconds: 100.0,
            rss_bytes: u64::MAX,
        };
        // Quadratic: 1, 4, 16, 64 s; the next (256 s) is predicted, not run.
        let quadratic = |l: usize| (l * l) as f64;
        let records = sweep_points(&points, &limits, &mut fake_run(quadratic, usize::MAX)).unwrap();
        assert_eq!(statuses(&records), ["ok", "ok", "ok", "ok", "skipped"]);
    }
}
