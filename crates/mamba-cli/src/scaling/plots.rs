//! The sweep's four SVG plots: prefill time, peak memory and decoding speed against the
//! prompt length, and decoding throughput against the batch at a fixed memory budget.

use super::report::{measured, prefill_slope, prefill_times};
use super::{Results, Sweep};
use anyhow::Result;
use mamba_train::plot::{line_chart, Axis, Chart, Scale, Series};
use std::path::Path;

/// Writes `prefill_time.svg`, `memory.svg`, `decode_vs_context.svg` and
/// `decode_vs_batch.svg` into `dir`.
pub fn draw_all(dir: &Path, results: &Results) -> Result<()> {
    line_chart(&dir.join("prefill_time.svg"), &prefill_time(results))?;
    line_chart(&dir.join("memory.svg"), &memory(results))?;
    line_chart(
        &dir.join("decode_vs_context.svg"),
        &decode_vs_context(results),
    )?;
    line_chart(&dir.join("decode_vs_batch.svg"), &decode_vs_batch(results))?;
    Ok(())
}

fn axis(label: &str, scale: Scale) -> Axis {
    Axis {
        label: label.into(),
        scale,
    }
}

fn prompt_axis() -> Axis {
    axis("prompt length (tokens)", Scale::Log)
}

/// One series per model, of what `value` gives for its measured points of `sweep`.
fn per_model(
    results: &Results,
    sweep: Sweep,
    label: impl Fn(usize) -> String,
    value: impl Fn(&super::Record, &super::point::Measured) -> (f64, f64),
) -> Vec<Series> {
    (0..results.subjects.len())
        .map(|s| Series {
            label: label(s),
            points: measured(results, s, sweep)
                .map(|(r, m)| value(r, m))
                .collect(),
            markers: true,
        })
        .collect()
}

/// Prefill seconds against prompt length on log-log axes, each model's fitted exponent
/// in the legend (1 is linear, 2 quadratic).
fn prefill_time(results: &Results) -> Chart {
    let series = (0..results.subjects.len())
        .map(|s| Series {
            label: format!(
                "{} (slope {})",
                results.subjects[s].name,
                prefill_slope(results, s).map_or_else(|| "-".into(), |k| format!("{k:.2}"))
            ),
            points: prefill_times(results, s),
            markers: true,
        })
        .collect();
    Chart {
        title: "Prefill time against prompt length (batch 1)".into(),
        x: prompt_axis(),
        y: axis("prefill time (s)", Scale::Log),
        series,
    }
}

/// Peak memory (weights included) against prompt length: the process's resident memory on
/// the CPU, the device pool's peak on a GPU.
fn memory(results: &Results) -> Chart {
    let on_device = results.records.iter().any(|r| {
        r.outcome
            .measured()
            .is_some_and(|m| m.peak_device_bytes.is_some())
    });
    let label = if on_device {
        "peak device memory (MiB)"
    } else {
        "peak RSS (MiB)"
    };
    Chart {
        title: "Peak memory against prompt length (batch 1)".into(),
        x: prompt_axis(),
        y: axis(label, Scale::Linear { from_zero: true }),
        series: per_model(
            results,
            Sweep::Length,
            |s| results.subjects[s].name.clone(),
            |r, m| {
                let bytes = m.peak_device_bytes.unwrap_or(m.peak_rss_bytes);
                (
                    r.point.prompt_len as f64,
                    bytes as f64 / (1u64 << 20) as f64,
                )
            },
        ),
    }
}

/// Decoding tokens per second after prompts of each length.
fn decode_vs_context(results: &Results) -> Chart {
    Chart {
        title: "Decoding speed against context length (batch 1)".into(),
        x: axis("context length (tokens)", Scale::Log),
        y: axis("decode tokens/s", Scale::Log),
        series: per_model(
            results,
            Sweep::Length,
            |s| results.subjects[s].name.clone(),
            |r, m| (r.point.prompt_len as f64, m.decode_tokens_per_s),
        ),
    }
}

/// Decoding tokens per second (all sequences together) against the batch, with the
/// batch at which each model first went over the memory budget in its legend.
fn decode_vs_batch(results: &Results) -> Chart {
    let a = results.args;
    Chart {
        title: format!(
            "Decoding throughput against batch (prompt {} tokens, budget {} GiB)",
            a.batch_prompt_len, a.memory_budget
        ),
        x: axis("batch (sequences)", Scale::Log),
        y: axis("decode tokens/s, all sequences", Scale::Log),
        series: per_model(
            results,
            Sweep::Batch,
            |s| batch_label(results, s),
            |r, m| (r.point.batch as f64, m.decode_tokens_per_s),
        ),
    }
}

/// The model's name, and where its batch sweep stopped if it did.
fn batch_label(results: &Results, subject: usize) -> String {
    let name = &results.subjects[subject].name;
    let stopped = results.records.iter().find(|r| {
        r.point.subject == subject && r.point.sweep == Sweep::Batch && !r.outcome.is_measured()
    });
    match stopped {
        Some(r) => format!("{name} ({} at batch {})", r.outcome.status(), r.point.batch),
        None => name.clone(),
    }
}
