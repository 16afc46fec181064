//! Charts as SVG: per-pod load over time (one panel per balancer, one line per pod), and
//! figures against cluster size.

use std::path::Path;

use anyhow::Result;
use plotters::{coord::types::RangedCoordf64, prelude::*};

/// One panel: its title, the pods' series of (seconds, requests per second), and when the
/// scale-up happened if there was one.
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub marker: Option<f64>,
}

pub fn write(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let areas = root.split_evenly((2, 2));
    let x_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|(_, s)| s.iter().map(|(x, _)| *x)))
        .fold(1.0, f64::max);
    let y_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|(_, s)| s.iter().map(|(_, y)| *y)))
        .fold(1.0, f64::max)
        * 1.1;
    for (area, panel) in areas.iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("requests/s per pod")
            .light_line_style(WHITE)
            .draw()?;
        if let Some(at) = panel.marker {
            chart.draw_series(LineSeries::new([(at, 0.0), (at, y_max)], BLACK.mix(0.3)))?;
        }
        for (i, (pod, points)) in panel.series.iter().enumerate() {
            line(&mut chart, i, pod, points)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present()?;
    Ok(())
}

/// Figures against the number of Services: one panel per (title, lines of (x, y) points).
pub type ScalingPanel<'a> = (&'a str, Vec<(&'a str, Vec<(f64, f64)>)>);

pub fn scaling(path: &Path, title: &str, panels: &[ScalingPanel]) -> Result<()> {
    let root = SVGBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (panel, lines)) in areas.iter().zip(panels) {
        let points = || lines.iter().flat_map(|(_, p)| p.iter().copied());
        let x_max = points().map(|(x, _)| x).fold(1.0, f64::max) * 1.05;
        let y_max = points().map(|(_, y)| y).fold(1e-3, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(*panel, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("Services")
            .light_line_style(WHITE)
            .draw()?;
        for (i, (name, points)) in lines.iter().enumerate() {
            line(&mut chart, i, name, points)?;
            let color = Palette99::pick(i).to_rgba();
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One named line in the palette's colour `i`, with its legend entry.
fn line(chart: &mut Chart, i: usize, name: &str, points: &[(f64, f64)]) -> Result<()> {
    let color = Palette99::pick(i).to_rgba();
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
    Ok(())
}

fn legend<'b>(chart: &mut Chart<'b, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .position(position)
        .draw()?;
    Ok(())
}
