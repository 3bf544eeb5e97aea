//! SVG plot of the masking path: quality (logit cosine or accuracy) against the op reduction
//! (encoding counted) after each greedy restore, with the chosen point marked.

use crate::error::{Error, Result};
use crate::passes::mask::MaskReport;
use plotters::prelude::*;

pub fn mask_path_svg(report: &MaskReport, title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 480)).into_drawing_area();
        let perr = |e: &dyn std::fmt::Display| Error::Other(format!("plot: {e}"));
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let use_acc = report.metric == "accuracy";
        let y_of = |p: &crate::passes::mask::PathPoint| -> f64 {
            if use_acc {
                p.accuracy.unwrap_or(0.0) * 100.0
            } else {
                p.logit_cosine
            }
        };
        let mut pts: Vec<(f64, f64)> = report
            .path
            .iter()
            .map(|p| (p.reduction_everything_counted * 100.0, y_of(p)))
            .collect();
        let fin = report
            .final_point
            .as_ref()
            .map(|p| (p.reduction_everything_counted * 100.0, y_of(p)));
        let all: Vec<(f64, f64)> = pts.iter().copied().chain(fin).collect();
        let (xmin, xmax) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (ymin, ymax) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = |lo: f64, hi: f64| {
            let d = (hi - lo).abs().max(1e-3) * 0.1;
            (lo - d, hi + d)
        };
        let ((x0, x1), (y0, y1)) = (pad(xmin, xmax), pad(ymin, ymax));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("arithmetic removed, encoding counted (%)")
            .y_desc(if use_acc {
                "top-1 accuracy (%)"
            } else {
                "logit cosine vs exact"
            })
            .draw()
            .map_err(|e| perr(&e))?;
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), &BLUE))
            .map_err(|e| perr(&e))?
            .label("greedy restores")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
            .map_err(|e| perr(&e))?;
        let c = &report.path[report.chosen_point];
        let chosen = (c.reduction_everything_counted * 100.0, y_of(c));
        chart
            .draw_series(std::iter::once(Circle::new(chosen, 7, RED.stroke_width(2))))
            .map_err(|e| perr(&e))?
            .label("chosen")
            .legend(|(x, y)| Circle::new((x + 8, y), 5, RED.stroke_width(2)));
        if let Some(f) = fin {
            chart
                .draw_series(std::iter::once(TriangleMarker::new(f, 7, GREEN.filled())))
                .map_err(|e| perr(&e))?
                .label("after relearning")
                .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, GREEN.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| perr(&e))?;
        root.present().map_err(|e| perr(&e))?;
    }
    Ok(svg)
}
