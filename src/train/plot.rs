//! Loss-curve plots as PNG, drawn with plotters' bitmap backend and a bundled font, so plotting
//! works on machines without system fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::io::checkpoint::io::write_atomic_with;
use crate::{MorError, Result};

/// DejaVu Sans (Bitstream Vera licence, see `fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../fonts/DejaVuSans.ttf");

/// Image size in pixels.
const SIZE: (u32, u32) = (1000, 600);

/// Distinct, colour-blind-friendly line colours (Okabe-Ito), reused cyclically.
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

/// One named curve: `(x, y)` points, e.g. (step or tokens, loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Register the bundled font once per process (plotters keeps a global font table).
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(MorError::Data("bundled plot font failed to parse".into()))
    }
}

/// Plot loss curves with x labelled "step" and y "loss"; see [`plot_curves`].
pub fn plot_loss_curves(out_png: &Path, title: &str, series: &[Series]) -> Result<()> {
    plot_curves(out_png, title, "step", "loss", series)
}

/// Plot `series` as lines with a legend and axis labels into `out_png` (must end in `.png`),
/// written atomically. Axis ranges cover all finite points with a small margin; with no finite
/// point an empty chart is drawn, so callers can plot from step 0 on.
pub fn plot_curves(
    out_png: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let is_png = out_png
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        // The bitmap encoder picks the format from the extension.
        return Err(MorError::Config(format!(
            "plot output {} must have a .png extension",
            out_png.display()
        )));
    }
    ensure_font()?;
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let (x_range, y_range) = ranges(finite.iter().flatten());

    write_atomic_with(out_png, |tmp| {
        let draw_err = |e: &dyn std::fmt::Display| {
            MorError::io(tmp, std::io::Error::other(format!("plotting: {e}")))
        };
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), y_range.clone())
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 14))
            .light_line_style(RGBColor(245, 245, 245))
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| tick_label(*v))
            .draw()
            .map_err(|e| draw_err(&e))?;
        for (i, (s, pts)) in series.iter().zip(&finite).enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = color.stroke_width(2);
            let drawn = chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(|e| draw_err(&e))?;
            drawn.label(s.name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
            if pts.len() == 1 {
                // A lone point draws no line; mark it so the series is still visible.
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| draw_err(&e))?;
            }
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
        Ok(())
    })
}

/// Compact tick text: integers without decimals, large values with K/M/B suffixes (token counts).
fn tick_label(v: f64) -> String {
    let a = v.abs();
    let trim = |x: f64, suffix: &str| {
        let s = format!("{x:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}{suffix}")
    };
    if a >= 1e9 {
        trim(v / 1e9, "B")
    } else if a >= 1e6 {
        trim(v / 1e6, "M")
    } else if a >= 1e4 {
        trim(v / 1e3, "K")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a < 0.01 {
        format!("{v:.1e}")
    } else {
        trim(v, "")
    }
}

/// Axis ranges covering `points` with a 3% margin (and a unit span when degenerate).
fn ranges<'a>(
    points: impl Iterator<Item = &'a (f64, f64)>,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = |lo: f64, hi: f64| {
        if lo > hi {
            return 0.0..1.0;
        }
        let span = hi - lo;
        if span == 0.0 {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
            return (lo - d)..(hi + d);
        }
        (lo - 0.03 * span)..(hi + 0.03 * span)
    };
    (pad(x0, x1), pad(y0, y1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_png() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("loss.png");
        let curve = |name: &str, scale: f64| Series {
            name: name.into(),
            points: (0..200)
                .map(|s| {
                    let x = s as f64 * 10.0;
                    (x, 2.5 + scale * 8.0 / (1.0 + s as f64 / 10.0))
                })
                .collect(),
        };
        let mut noisy = curve("MoR r=3 (expert-choice)", 0.8);
        noisy.points.push((2000.0, f64::NAN));
        let series = vec![
            curve("Vanilla", 1.0),
            noisy,
            Series {
                name: "single point".into(),
                points: vec![(1000.0, 6.0)],
            },
        ];
        plot_loss_curves(&out, "Training loss", &series).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 10_000,
            "suspiciously small PNG: {}",
            bytes.len()
        );
        // Only the PNG remains: the temp file was renamed.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

        // Empty input still draws a chart; a non-PNG name is refused.
        plot_loss_curves(&d.path().join("empty.png"), "empty", &[]).unwrap();
        assert!(plot_loss_curves(&d.path().join("x.jpg"), "t", &series).is_err());
        if let Ok(dir) = std::env::var("MOR_PLOT_TEST_OUT") {
            std::fs::copy(&out, Path::new(&dir).join("loss.png")).unwrap();
        }
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(200.0), "200");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(1.23456), "1.23");
        assert_eq!(tick_label(25_000.0), "25K");
        assert_eq!(tick_label(1_500_000.0), "1.5M");
        assert_eq!(tick_label(2e9), "2B");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.0015), "1.5e-3");
    }

    #[test]
    fn range_padding() {
        let (x, y) = ranges([(0.0, 1.0), (10.0, 3.0)].iter());
        assert!(x.start < 0.0 && x.end > 10.0 && y.start < 1.0 && y.end > 3.0);
        let (x, y) = ranges([(5.0, 0.0)].iter());
        assert!(x.start < 5.0 && x.end > 5.0 && y.start < 0.0 && y.end > 0.0);
        assert_eq!(ranges(std::iter::empty()).0, 0.0..1.0);
    }
}
