//! SVG charts of `efr-load compare`, drawn with plotters' SVG backend (no font files: the
//! SVG holds `<text>` elements and the viewer renders them). Per workload: a bar chart of
//! notifications/s per configuration, and the p50, p99 and p99.9 latency of each
//! configuration as points joined by a line, in ms on a log axis with labelled ticks; the
//! caption says how the workload was paced (an unpaced run's latency includes queueing
//! behind the source). A failed configuration is drawn in red and its label says FAIL; the
//! ceiling is drawn in grey.

use std::path::Path;

use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::RangedCoordusize;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::ms;
use super::rows::{Row, Verdict, CEILING_NAME};
use super::workload_spec::WorkloadSpec;

/// Width given to each configuration, pixels.
pub const BAR_SLOT_PX: u32 = 130;
/// Width of the chart beyond the bars (axis, margins), pixels.
pub const CHART_EXTRA_PX: u32 = 160;
/// Height of a chart, pixels.
pub const CHART_HEIGHT_PX: u32 = 480;
/// Space under the plot for the configuration names, pixels.
pub const X_LABEL_AREA_PX: u32 = 60;
/// Space left of the plot for the values, pixels.
pub const Y_LABEL_AREA_PX: u32 = 90;
/// Margin around the plot, pixels.
pub const MARGIN_PX: u32 = 15;
/// Gap between neighbouring bars' groups, pixels (each side).
pub const BAR_GAP_PX: u32 = 10;
/// Headroom above the tallest bar, as a factor.
pub const HEADROOM: f64 = 1.15;
/// Font size of the title.
pub const TITLE_FONT: u32 = 20;
/// Font size of the labels.
pub const LABEL_FONT: u32 = 13;

/// Colour of a passing configuration's bar.
const PASS_COLOUR: RGBColor = RGBColor(0x33, 0x66, 0xaa);
/// Colour of a failing configuration's bar.
const FAIL_COLOUR: RGBColor = RGBColor(0xcc, 0x33, 0x33);
/// Colour of the ceiling's bar.
const CEILING_COLOUR: RGBColor = RGBColor(0x88, 0x88, 0x88);
/// Radius of a latency point, pixels.
pub const POINT_PX: i32 = 5;
/// Gap between the latency axis and its tick labels, pixels.
pub const TICK_LABEL_GAP_PX: i32 = 6;
/// Colour of the latency axis's tick lines.
const TICK_LINE_COLOUR: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
/// Colour of the line joining one configuration's latency points.
const RANGE_COLOUR: RGBColor = RGBColor(0x99, 0x99, 0x99);
/// Colours of the p50, p99 and p99.9 points.
const LATENCY_COLOURS: [RGBColor; 3] = [
    RGBColor(0x44, 0x99, 0x55),
    RGBColor(0xdd, 0x88, 0x22),
    RGBColor(0xaa, 0x33, 0x66),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

fn label(r: &Row) -> String {
    match r.verdict() {
        Verdict::Pass | Verdict::KnownWrongPassed => r.server.clone(),
        Verdict::Fail => format!("{} FAIL", r.server),
        Verdict::ExpectedFail => format!("{} FAIL (expected)", r.server),
        Verdict::Skipped => format!("{} (cannot run)", r.server),
    }
}

fn colour(r: &Row) -> RGBColor {
    if !r.pass {
        FAIL_COLOUR
    } else if r.server == CEILING_NAME {
        CEILING_COLOUR
    } else {
        PASS_COLOUR
    }
}

/// Writes the charts of every workload into `dir`; returns their file names.
pub fn write_charts(
    dir: &Path,
    workloads: &[WorkloadSpec],
    rows: &[Row],
) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    for w in workloads {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == w.label).collect();
        if rows.is_empty() {
            continue;
        }
        let name = format!("notifications-{}.svg", w.label);
        throughput_chart(&dir.join(&name), &w.label, &rows)?;
        files.push(name);
        let name = format!("latency-{}.svg", w.label);
        latency_chart(&dir.join(&name), w, &rows)?;
        files.push(name);
    }
    Ok(files)
}

fn size(n: usize) -> (u32, u32) {
    (
        BAR_SLOT_PX * n.max(1) as u32 + CHART_EXTRA_PX,
        CHART_HEIGHT_PX,
    )
}

/// `v` in the unit that suits `scale` (the largest value shown).
fn rate(v: f64, scale: f64) -> String {
    if scale >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if scale >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// One segment per configuration: a segmented range has one segment more than its values.
fn slots(n: usize) -> SegmentedCoord<RangedCoordusize> {
    (0..n.saturating_sub(1)).into_segmented()
}

fn names(rows: &[&Row]) -> Vec<String> {
    rows.iter().map(|r| label(r)).collect()
}

/// Notifications/s per configuration.
pub fn throughput_chart(path: &Path, workload: &str, rows: &[&Row]) -> anyhow::Result<()> {
    let root: Area = SVGBackend::new(path, size(rows.len())).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = rows
        .iter()
        .filter_map(|r| r.notifications_per_s)
        .fold(1.0f64, f64::max)
        * HEADROOM;
    let labels = names(rows);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: notifications/s (median)"),
            ("sans-serif", TITLE_FONT),
        )
        .margin(MARGIN_PX)
        .x_label_area_size(X_LABEL_AREA_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(slots(rows.len()), 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_style(("sans-serif", LABEL_FONT))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("notifications/s")
        .y_label_formatter(&|v| rate(*v, top))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let v = r.notifications_per_s.unwrap_or(0.0);
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), v),
                ],
                colour(r).filled(),
            );
            bar.set_margin(0, 0, BAR_GAP_PX, BAR_GAP_PX);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let v = r.notifications_per_s.unwrap_or(0.0);
            let text = match (r.notifications_per_s, r.ratio_to_ceiling) {
                (Some(v), Some(x)) => format!("{} ({x:.2}x)", rate(v, v)),
                (Some(v), None) => rate(v, v),
                (None, _) => "no result".to_string(),
            };
            Text::new(
                text,
                (SegmentValue::Exact(i), v),
                ("sans-serif", LABEL_FONT).into_font(),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The 1-2-5 values (1, 2, 5, 10, 20, ...) between `lo` and `hi`, both > 0.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powi(lo.log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                out.push(t);
            }
        }
        decade *= 10.0;
    }
    out
}

/// p50, p99 and p99.9 latency per configuration: points joined by a line, in ms on a log
/// axis with labelled ticks. The caption says how the workload was paced.
pub fn latency_chart(path: &Path, w: &WorkloadSpec, rows: &[&Row]) -> anyhow::Result<()> {
    let (width, height) = size(rows.len());
    let root: Area = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let values_ms = |r: &Row| [r.p50_us, r.p99_us, r.p999_us].map(|v| v.map(|us| us / 1e3));
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|r| values_ms(r))
        .flatten()
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0f64, f64::max);
    let (lo, hi) = if all.is_empty() {
        (0.01, 10.0)
    } else {
        (lo / 1.5, hi * 1.5)
    };
    let labels = names(rows);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: latency p50 / p99 / p99.9, ms ({})",
                w.label,
                w.latency_kind()
            ),
            ("sans-serif", TITLE_FONT),
        )
        .margin(MARGIN_PX)
        .x_label_area_size(X_LABEL_AREA_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(slots(rows.len()), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_style(("sans-serif", LABEL_FONT))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .disable_y_mesh()
        .y_labels(0)
        .y_label_formatter(&|_| String::new())
        .y_desc("latency, ms (log scale)")
        .draw()
        .map_err(err)?;
    // plotters labels a log axis at powers of ten only: draw 1-2-5 ticks, each labelled.
    let ticks = log_ticks(lo, hi);
    chart
        .draw_series(ticks.iter().map(|&t| {
            PathElement::new(
                vec![(SegmentValue::Exact(0), t), (SegmentValue::Last, t)],
                TICK_LINE_COLOUR.stroke_width(1),
            )
        }))
        .map_err(err)?;
    let font = TextStyle::from(("sans-serif", LABEL_FONT).into_font())
        .pos(Pos::new(HPos::Right, VPos::Center));
    for &t in &ticks {
        let (x, y) = chart
            .plotting_area()
            .map_coordinate(&(SegmentValue::Exact(0), t));
        root.draw(&Text::new(ms(t), (x - TICK_LABEL_GAP_PX, y), font.clone()))
            .map_err(err)?;
    }
    // One configuration: a line from its p50 to its p99.9, a point per percentile.
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let v = values_ms(r);
            let (low, high) = (v[0]?, v[2]?);
            Some(PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), low),
                    (SegmentValue::CenterOf(i), high),
                ],
                RANGE_COLOUR.stroke_width(2),
            ))
        }))
        .map_err(err)?;
    for (k, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let c = LATENCY_COLOURS[k];
        chart
            .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
                let v = values_ms(r)[k]?;
                Some(Circle::new(
                    (SegmentValue::CenterOf(i), v),
                    POINT_PX,
                    c.filled(),
                ))
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 5, y), POINT_PX, c.filled()));
        // The value beside each point, so that it can be read without the axis.
        chart
            .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
                let v = values_ms(r)[k]?;
                Some(Text::new(
                    format!("  {}", ms(v)),
                    (SegmentValue::CenterOf(i), v),
                    ("sans-serif", LABEL_FONT).into_font().color(&c),
                ))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_one_two_five() {
        let t = log_ticks(0.015, 12.0);
        assert_eq!(t.len(), 9);
        for (got, want) in t
            .iter()
            .zip([0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
        {
            assert!((got / want - 1.0).abs() < 1e-9, "{t:?}");
        }
        assert!(log_ticks(3.0, 4.0).is_empty());
    }
}
