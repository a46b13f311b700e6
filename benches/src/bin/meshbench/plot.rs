//! `--plot FILE.svg`: the fixed-rate load's latency by percentile, direct, through the plain relay pair
//! and through the mesh, as an SVG chart drawn with plotters' SVG backend (text is written as SVG `<text>`, so no font library is
//! needed).
//!
//! The percentile axis is the usual one for latency distributions: `x = log10(1 / (1 - p))`, so 90 %,
//! 99 %, 99.9 % ... are evenly spaced and the tail gets as much room as the median. The latency axis is
//! logarithmic too, since a busy machine's tail is often orders of magnitude above its median. Only the
//! fixed-rate load is drawn: `wrk --latency` reports four percentiles, not a distribution, and four points
//! would be a drawing of an interpolation, not of a measurement.

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::load::{Kind, Output, Results};

/// The chart's size in pixels.
const SIZE: (u32, u32) = (960, 600);
/// Points per decade of `1 / (1 - p)` on each curve.
const POINTS_PER_DECADE: u32 = 50;

/// The decades of `1 / (1 - p)` the percentile axis spans for `samples` samples: one past the decade
/// holding the last sample, so that the curve's end is the maximum.
fn decades(samples: u64) -> u32 {
    // ilog10 is exact for integers; 0 and 1 samples still get one decade (0 to 90 %).
    samples.max(1).ilog10() + 1
}

/// The percentile `p` (0 to 100) at `x = log10(1 / (1 - p/100))`.
fn percentile_at(x: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-x))
}

/// The curve of `histogram` on the percentile axis: `(x, µs)` every `1 / per_decade` of a decade, from
/// 0 (the minimum) to where only the maximum is left. Empty for an empty histogram.
fn curve(histogram: &Histogram<u64>, per_decade: u32, decades: u32) -> Vec<(f64, u64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let steps = per_decade.max(1) * decades;
    (0..=steps)
        .map(|step| {
            let x = f64::from(step) / f64::from(per_decade.max(1));
            (x, histogram.value_at_percentile(percentile_at(x)))
        })
        .collect()
}

/// `histogram`'s latency (µs) at percentiles spaced `1 / per_decade` of a decade apart on the chart's
/// axis, up to its maximum (which comes last, at percentile 100). For the JSON report.
pub(crate) fn percentile_points(histogram: &Histogram<u64>, per_decade: u32) -> Vec<(f64, u64)> {
    let mut points: Vec<(f64, u64)> = curve(histogram, per_decade, decades(histogram.len()))
        .into_iter()
        .map(|(x, us)| (percentile_at(x), us))
        .collect();
    if !histogram.is_empty() {
        points.push((100.0, histogram.max()));
    }
    points
}

/// A percentile axis label: `0%`, `90%`, `99%`, `99.9%` ... with as many decimals as the decade needs.
fn percentile_label(x: f64) -> String {
    // The first whole decade at or past `x` (the axis never spans more than 20 of them).
    let decade = (0..20usize).find(|d| *d as f64 >= x).unwrap_or(20);
    let decimals = decade.saturating_sub(2);
    format!("{:.*}%", decimals, percentile_at(x))
}

/// The SVG chart of each `(name, histogram)`'s latency by percentile, under `title`.
pub(crate) fn latency_chart(title: &str, series: &[(&str, &Histogram<u64>)]) -> Result<String, String> {
    let samples = series.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    if samples == 0 {
        return Err("no latency was recorded, so there is nothing to plot".into());
    }
    let decades = decades(samples);
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, histogram)| {
            let points = curve(histogram, POINTS_PER_DECADE, decades)
                .into_iter()
                // The log axis cannot show 0; a 0 µs latency is below the histogram's resolution anyway.
                .map(|(x, us)| (x, us.max(1) as f64))
                .collect();
            (*name, points)
        })
        .collect();
    let values = || {
        curves
            .iter()
            .flat_map(|(_, points)| points.iter().map(|(_, us)| *us))
    };
    let lowest = values().fold(f64::INFINITY, f64::min);
    let highest = values().fold(1.0, f64::max);
    let mut svg = String::new();
    draw(
        &mut svg,
        title,
        &curves,
        decades,
        (lowest * 0.8).max(0.5),
        highest * 1.25,
    )
    .map_err(|e| format!("drawing the chart: {e}"))?;
    Ok(svg)
}

/// Draws the chart into `svg`.
fn draw(
    svg: &mut String,
    title: &str,
    curves: &[(&str, Vec<(f64, f64)>)],
    decades: u32,
    lowest: f64,
    highest: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..f64::from(decades), (lowest..highest).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(decades as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .x_desc("percentile (log10 of 1 / (1 - p))")
        .y_label_formatter(&|us| format!("{us:.0}"))
        .y_desc("latency, µs (log scale)")
        .draw()?;
    for ((name, points), color) in curves.iter().zip(COLORS.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The chart of the run's fixed-rate load, direct, relay and mesh.
pub(crate) fn fixed_rate_chart(results: &Results) -> Result<String, String> {
    let result = results
        .loads
        .iter()
        .find(|result| matches!(result.load.kind, Kind::FixedRate { .. }))
        .ok_or("the run has no fixed-rate load to plot")?;
    let (Output::FixedRate(direct), Output::FixedRate(relay), Output::FixedRate(mesh)) =
        (&result.direct.output, &result.relay.output, &result.mesh.output)
    else {
        return Err("the fixed-rate load has no latency histograms".into());
    };
    let title = format!(
        "{}, {} KiB: latency by percentile, from each request's due time",
        result.load.name,
        crate::fixedrate::MESSAGE_BYTES / 1024
    );
    let direct_name = format!("direct (p50 {} µs)", direct.latency_at(50.0));
    let relay_name = format!("plain relay pair (p50 {} µs)", relay.latency_at(50.0));
    let mesh_name = format!("mesh (p50 {} µs)", mesh.latency_at(50.0));
    latency_chart(
        &title,
        &[
            (&direct_name, &direct.latency_us),
            (&relay_name, &relay.latency_us),
            (&mesh_name, &mesh.latency_us),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 samples: 1..=1000 µs, one each.
    fn uniform() -> Histogram<u64> {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            histogram.record(us).unwrap();
        }
        histogram
    }

    #[test]
    fn the_percentile_axis_is_evenly_spaced_in_nines() {
        assert!((percentile_at(0.0) - 0.0).abs() < 1e-9);
        assert!((percentile_at(1.0) - 90.0).abs() < 1e-9);
        assert!((percentile_at(3.0) - 99.9).abs() < 1e-9);
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
        // One decade past the one holding the last sample: 1,000 samples reach 99.9 %, the axis 99.99 %.
        assert_eq!(decades(1000), 4);
        assert_eq!(decades(3000), 4);
        assert_eq!(decades(0), 1);
    }

    #[test]
    fn points_rise_with_the_percentile_and_end_at_the_maximum() {
        let histogram = uniform();
        let points = percentile_points(&histogram, 10);
        assert_eq!(points.first(), Some(&(0.0, 1)));
        assert_eq!(points.last(), Some(&(100.0, 1000)));
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        // 90 % of 1..=1000 is 900; the axis' last point, past the last sample, is already the maximum.
        let at_90 = points.iter().find(|(p, _)| (p - 90.0).abs() < 1e-9).unwrap();
        assert_eq!(at_90.1, 900);
        let end = curve(&histogram, 10, decades(1000));
        assert_eq!(end.last().map(|(_, us)| *us), Some(1000));
        assert!(percentile_points(&Histogram::new(3).unwrap(), 10).is_empty());
    }

    #[test]
    fn the_chart_is_an_svg_with_both_curves_their_names_and_the_nines() {
        let direct = uniform();
        let mut mesh = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            mesh.record(us * 3).unwrap();
        }
        let svg = latency_chart("test chart", &[("direct", &direct), ("mesh", &mesh)]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in ["test chart", "direct", "mesh", "99.9%", "latency, µs"] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
        // Two curves and two legend lines.
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
    }

    #[test]
    fn an_empty_run_has_nothing_to_plot() {
        let empty = Histogram::new(3).unwrap();
        let error = latency_chart("t", &[("direct", &empty)]).unwrap_err();
        assert!(error.contains("nothing to plot"), "{error}");
    }
}
