//! The sweep's results as a CSV file, a JSON document and Markdown tables, with the
//! fitted growth of prefill time in the prompt length.

use super::point::Measured;
use super::{Record, Results, Sweep};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

const CSV_HEADER: &str = "model,family,parameters,sweep,prompt_len,batch,status,\
prefill_seconds,prefill_tokens_per_s,decode_tokens_per_s,ms_per_decode_step,peak_rss_bytes,\
wall_seconds,note,peak_device_bytes";

/// One line per point, skipped and stopped points included (their measurements empty).
pub fn write_csv(path: &Path, results: &Results) -> Result<()> {
    let mut text = format!("{CSV_HEADER}\n");
    for record in &results.records {
        let subject = &results.subjects[record.point.subject];
        let measured = record.outcome.measured();
        let value = |f: fn(&Measured) -> String| measured.map(f).unwrap_or_default();
        let fields = [
            csv_field(&subject.name),
            subject.family.to_string(),
            parameters(results, record.point.subject).map_or_else(String::new, |p| p.to_string()),
            record.point.sweep.name().to_string(),
            record.point.prompt_len.to_string(),
            record.point.batch.to_string(),
            record.outcome.status().to_string(),
            value(|m| m.prefill_seconds.to_string()),
            value(|m| m.prefill_tokens_per_s.to_string()),
            value(|m| m.decode_tokens_per_s.to_string()),
            value(|m| m.ms_per_decode_step.to_string()),
            value(|m| m.peak_rss_bytes.to_string()),
            record.wall_seconds.to_string(),
            csv_field(&record.outcome.note()),
            measured
                .and_then(|m| m.peak_device_bytes)
                .map_or_else(String::new, |b| b.to_string()),
        ];
        text.push_str(&fields.join(","));
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// `text` as one CSV field: quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub fn write_json(path: &Path, document: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(document)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// The whole sweep: how it was run, a summary per model and every point.
pub fn document(results: &Results) -> Value {
    let a = results.args;
    let models: Vec<Value> = (0..results.subjects.len())
        .map(|s| {
            let subject = &results.subjects[s];
            json!({
                "name": subject.name,
                "family": subject.family.to_string(),
                "parameters": parameters(results, s),
                "max_len": subject.max_len,
                "prefill_slope": prefill_slope(results, s),
                "prefill_slope_last_doubling": last_doubling_slope(results, s),
                "longest_prompt": largest(results, s, Sweep::Length, |r| r.point.prompt_len),
                "largest_batch": largest(results, s, Sweep::Batch, |r| r.point.batch),
            })
        })
        .collect();
    let points: Vec<Value> = results
        .records
        .iter()
        .map(|r| point_json(results, r))
        .collect();
    json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "unix_time": unix_time(),
        "threads": results.threads.unwrap_or_else(rayon::current_num_threads),
        "settings": {
            "min_len": a.min_len,
            "max_len": a.max_len,
            "gen_len": a.gen_len,
            "max_batch": a.max_batch,
            "batch_prompt_len": a.batch_prompt_len,
            "chunk_size": a.chunk.chunk_size,
            "memory_budget_gib": a.memory_budget,
            "point_timeout_seconds": a.point_timeout,
            "device": a.device.as_arg(),
        },
        "wall_seconds": results.wall_seconds,
        "models": models,
        "points": points,
    })
}

fn point_json(results: &Results, record: &Record) -> Value {
    let m = record.outcome.measured();
    json!({
        "model": results.subjects[record.point.subject].name,
        "sweep": record.point.sweep.name(),
        "prompt_len": record.point.prompt_len,
        "batch": record.point.batch,
        "status": record.outcome.status(),
        "note": record.outcome.note(),
        "wall_seconds": record.wall_seconds,
        "prefill_seconds": m.map(|m| m.prefill_seconds),
        "prefill_tokens_per_s": m.map(|m| m.prefill_tokens_per_s),
        "decode_tokens_per_s": m.map(|m| m.decode_tokens_per_s),
        "ms_per_decode_step": m.map(|m| m.ms_per_decode_step),
        "peak_rss_bytes": m.map(|m| m.peak_rss_bytes),
        "peak_device_bytes": m.and_then(|m| m.peak_device_bytes),
    })
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The model's parameters, as any of its measured points reported them.
pub fn parameters(results: &Results, subject: usize) -> Option<u64> {
    results
        .records
        .iter()
        .filter(|r| r.point.subject == subject)
        .find_map(|r| r.outcome.measured().map(|m| m.parameters))
}

/// The measured points of one model's sweep, in order, with their measurements.
pub fn measured<'r>(
    results: &'r Results,
    subject: usize,
    sweep: Sweep,
) -> impl Iterator<Item = (&'r Record, &'r Measured)> {
    results
        .records
        .iter()
        .filter(move |r| r.point.subject == subject && r.point.sweep == sweep)
        .filter_map(|r| r.outcome.measured().map(|m| (r, m)))
}

/// `(prompt length, prefill seconds)` of a model's measured length points.
pub fn prefill_times(results: &Results, subject: usize) -> Vec<(f64, f64)> {
    measured(results, subject, Sweep::Length)
        .map(|(r, m)| (r.point.prompt_len as f64, m.prefill_seconds))
        .collect()
}

/// The exponent `k` of prefill time `~ length^k`, fitted over all measured lengths.
pub fn prefill_slope(results: &Results, subject: usize) -> Option<f64> {
    log_log_slope(&prefill_times(results, subject))
}

/// The exponent between the two longest measured prompts: how the cost grows at the end
/// of the range (1 for linear, towards 2 where attention's quadratic part dominates).
fn last_doubling_slope(results: &Results, subject: usize) -> Option<f64> {
    match prefill_times(results, subject).as_slice() {
        [.., a, b] => log_log_slope(&[*a, *b]),
        _ => None,
    }
}

fn largest(
    results: &Results,
    subject: usize,
    sweep: Sweep,
    of: fn(&Record) -> usize,
) -> Option<usize> {
    measured(results, subject, sweep).map(|(r, _)| of(r)).max()
}

/// Least-squares slope of `ln y` against `ln x` over the points with both positive;
/// `None` with fewer than two distinct `x`.
pub fn log_log_slope(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    let n = logs.len() as f64;
    let mean_x = logs.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = logs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = logs.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = logs.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (logs.len() >= 2 && sxx > 0.0).then(|| sxy / sxx)
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

/// Markdown tables: the models with their fitted slopes, then every point of each sweep.
pub fn tables(results: &Results) -> String {
    let mut out = String::new();
    let slope = |s: Option<f64>| s.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
    out.push_str("| model | family | parameters | prefill slope (all lengths) | slope of the last doubling |\n");
    out.push_str("|---|---|---|---|---|\n");
    for (s, subject) in results.subjects.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            subject.name,
            subject.family,
            parameters(results, s).map_or_else(|| "-".into(), |p| p.to_string()),
            slope(prefill_slope(results, s)),
            slope(last_doubling_slope(results, s)),
        );
    }
    out.push_str("\n| model | prompt | prefill s | prefill tokens/s | decode tokens/s | peak memory MiB | wall s | status |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in results
        .records
        .iter()
        .filter(|r| r.point.sweep == Sweep::Length)
    {
        let m = r.outcome.measured();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            results.subjects[r.point.subject].name,
            r.point.prompt_len,
            m.map_or_else(|| "-".into(), |m| format!("{:.2}", m.prefill_seconds)),
            m.map_or_else(|| "-".into(), |m| format!("{:.0}", m.prefill_tokens_per_s)),
            m.map_or_else(|| "-".into(), |m| format!("{:.1}", m.decode_tokens_per_s)),
            m.map_or_else(|| "-".into(), peak_memory),
            r.wall_seconds,
            status_text(r),
        );
    }
    let _ = writeln!(
        out,
        "\n| model | batch (prompt {}) | decode tokens/s | ms per step | peak memory MiB | status |",
        results.args.batch_prompt_len
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for r in results
        .records
        .iter()
        .filter(|r| r.point.sweep == Sweep::Batch)
    {
        let m = r.outcome.measured();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            results.subjects[r.point.subject].name,
            r.point.batch,
            m.map_or_else(|| "-".into(), |m| format!("{:.1}", m.decode_tokens_per_s)),
            m.map_or_else(|| "-".into(), |m| format!("{:.1}", m.ms_per_decode_step)),
            m.map_or_else(|| "-".into(), peak_memory),
            status_text(r),
        );
    }
    out
}

/// Peak memory in MiB: the process's RSS on the CPU, the device pool's peak on a GPU.
fn peak_memory(m: &Measured) -> String {
    match m.peak_device_bytes {
        Some(bytes) => format!("{} (device)", mib(bytes)),
        None => mib(m.peak_rss_bytes),
    }
}

/// The status, with the reason for points without a measurement.
fn status_text(record: &Record) -> String {
    match record.outcome.note() {
        note if note.is_empty() => record.outcome.status().to_string(),
        note => format!("{} ({note})", record.outcome.status()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_of_power_laws_are_their_exponents() {
        let power = |k: f64| -> Vec<(f64, f64)> {
            [1024.0, 2048.0, 4096.0, 8192.0]
                .iter()
                .map(|&x: &f64| (x, 3.0 * x.powf(k)))
                .collect()
        };
        for k in [1.0, 2.0, 0.5] {
            let slope = log_log_slope(&power(k)).unwrap();
            assert!((slope - k).abs() < 1e-9, "{k}: {slope}");
        }
        assert_eq!(log_log_slope(&[(2.0, 1.0)]), None);
        assert_eq!(log_log_slope(&[(2.0, 1.0), (2.0, 3.0)]), None);
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a, \"b\""), "\"a, \"\"b\"\"\"");
    }
}
