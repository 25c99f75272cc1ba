//! Line charts as SVG files: the training loss curve, and any chart of a few series on
//! linear or logarithmic axes (the scaling benchmark's plots).

use crate::{Error, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its entry in the legend.
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Mark each point with a dot (for series of a few measured points).
    pub markers: bool,
}

/// How an axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear, from just below the smallest value shown, or from zero.
    Linear { from_zero: bool },
    /// Logarithmic; values of zero or below are left out.
    Log,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub label: String,
    pub scale: Scale,
}

/// A chart of several series sharing two axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
}

/// Series colours, in order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Draws the training loss (`(step, loss)`) and validation points into an SVG file at `path`.
pub fn loss_curve(path: &Path, train: &[(usize, f64)], val: &[(usize, f64)]) -> Result<()> {
    let series = |label: &str, points: &[(usize, f64)], markers| Series {
        label: label.to_string(),
        points: points.iter().map(|&(s, l)| (s as f64, l)).collect(),
        markers,
    };
    line_chart(
        path,
        &Chart {
            title: "loss (nats per token)".into(),
            x: Axis {
                label: "step".into(),
                scale: Scale::Linear { from_zero: true },
            },
            y: Axis {
                label: "loss".into(),
                scale: Scale::Linear { from_zero: false },
            },
            series: vec![
                series("train", train, false),
                series("validation", val, true),
            ],
        },
    )
}

/// Draws `chart` into an SVG file at `path`.
pub fn line_chart(path: &Path, chart: &Chart) -> Result<()> {
    let err = |e: String| Error::Plot(format!("{}: {e}", path.display()));
    let shown = shown_points(chart);
    let xs = value_range(shown.iter().map(|p| p.0), chart.x.scale);
    let ys = value_range(shown.iter().map(|p| p.1), chart.y.scale);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    match (chart.x.scale, chart.y.scale) {
        (Scale::Log, Scale::Log) => draw(&root, chart, xs.log_scale(), ys.log_scale()),
        (Scale::Log, Scale::Linear { .. }) => draw(&root, chart, xs.log_scale(), ys),
        (Scale::Linear { .. }, Scale::Log) => draw(&root, chart, xs, ys.log_scale()),
        (Scale::Linear { .. }, Scale::Linear { .. }) => draw(&root, chart, xs, ys),
    }
    .map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// The points of every series that the axes can show (positive ones on log axes).
fn shown_points(chart: &Chart) -> Vec<(f64, f64)> {
    chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&(x, y)| fits(x, chart.x.scale) && fits(y, chart.y.scale))
        .collect()
}

fn fits(v: f64, scale: Scale) -> bool {
    v.is_finite() && (scale != Scale::Log || v > 0.0)
}

/// The range of an axis showing `values`, with a margin.
fn value_range(values: impl Iterator<Item = f64>, scale: Scale) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return match scale {
            Scale::Log => 1.0..10.0,
            Scale::Linear { .. } => 0.0..1.0,
        };
    }
    match scale {
        Scale::Log => lo / 1.3..hi * 1.3,
        Scale::Linear { from_zero: true } => lo.min(0.0)..positive_span(lo.min(0.0), hi * 1.05),
        Scale::Linear { from_zero: false } => {
            let margin = (hi - lo).abs().max(hi.abs() * 1e-3).max(1e-9) * 0.05;
            lo - margin..hi + margin
        }
    }
}

/// `hi`, or a little above `lo` when the range would be empty.
fn positive_span(lo: f64, hi: f64) -> f64 {
    if hi > lo {
        hi
    } else {
        lo + 1.0
    }
}

/// The axes, the series and the legend on `root`, with the axes' coordinate types.
fn draw<X, Y>(
    root: &DrawingArea<SVGBackend, Shift>,
    chart: &Chart,
    x: X,
    y: Y,
) -> std::result::Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    ctx.configure_mesh()
        .x_desc(chart.x.label.as_str())
        .y_desc(chart.y.label.as_str())
        .light_line_style(BLACK.mix(0.04))
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .draw()
        .map_err(e)?;
    for (i, series) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = series
            .points
            .iter()
            .copied()
            .filter(|&(x, y)| fits(x, chart.x.scale) && fits(y, chart.y.scale));
        let size = if series.markers { 3 } else { 0 };
        ctx.draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(size))
            .map_err(e)?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(e)
}

/// A tick value in few characters: `1.5`, `2048`, `16K`, `1M`.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trimmed(v / 1e6))
    } else if a >= 1e4 {
        format!("{}K", trimmed(v / 1e3))
    } else {
        trimmed(v)
    }
}

/// `v` with at most three decimals and no trailing zeros.
fn trimmed(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(2048.0), "2048");
        assert_eq!(tick_label(16000.0), "16K");
        assert_eq!(tick_label(12500.0), "12.5K");
        assert_eq!(tick_label(1_000_000.0), "1M");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(-3.0), "-3");
    }

    #[test]
    fn log_axes_leave_out_what_they_cannot_show() {
        let shown = [0.0, -1.0, 10.0, 1000.0]
            .into_iter()
            .filter(|&v| fits(v, Scale::Log));
        let range = value_range(shown, Scale::Log);
        assert!(range.start > 0.0 && range.start < 10.0 && range.end > 1000.0);
    }
}
