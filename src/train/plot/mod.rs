//! The loss curve of a run, drawn from its `metrics.jsonl`: `loss_curve.svg` and
//! `loss_curve.png`, the same chart twice.
//!
//! What is drawn: the train loss as a faint line with a smoothed line over it, the eval loss as
//! markers joined by a line, the learning rate (dashed) on a second axis at the right, a legend
//! above, and round tick values (1, 2 or 5 × 10^k apart) on every axis.
//!
//! - **Smoothing**: TensorBoard's, a debiased exponential moving average, with the weight
//!   `1 − 30/n` for `n` train-loss points (to three decimals, at most 0.999; 0.85 for 200
//!   points), so a run of any length shows about the same wiggle; none under 60 points. The
//!   legend gives the weight.
//! - **Bad values**: NaN and infinite losses or learning rates are left out, and a note on the
//!   chart says how many and at which steps.
//! - **Long runs**: a series is thinned to the first, lowest, highest and last point of each
//!   column of the plot, so 10⁵ steps draw the same outline as all of them, and the SVG stays
//!   small (under 200 KB).
//!
//! The chart is computed once (`chart.rs`: scales, ticks from `ticks.rs`, series in drawing
//! coordinates from `series.rs`, legend, notes) and rendered twice: by `svg.rs` as text, and by
//! `raster.rs` into pixels (with the hand-drawn bitmap font of `font.rs`) that `png.rs`
//! encodes.

mod chart;
mod font;
mod png;
mod raster;
mod series;
mod svg;
mod ticks;

use std::path::Path;

use crate::error::Result;
use crate::io::adapters::write_atomic;
use crate::train::metrics::Metrics;

/// The loss curve of `metrics` as an SVG document (800 × 450).
pub fn loss_curve_svg(metrics: &[Metrics]) -> String {
    svg::render(&chart::loss_chart(metrics))
}

/// The loss curve of `metrics` as a PNG file (1200 × 675 pixels, RGB).
pub fn loss_curve_png(metrics: &[Metrics]) -> Vec<u8> {
    let canvas = raster::render(&chart::loss_chart(metrics));
    png::encode_rgb(canvas.width, canvas.height, &canvas.to_rgb8())
}

/// Writes `loss_curve.svg` and `loss_curve.png` into `dir`, each atomically.
pub(crate) fn write_loss_curves(dir: &Path, metrics: &[Metrics]) -> Result<()> {
    let chart = chart::loss_chart(metrics);
    write_atomic(&dir.join("loss_curve.svg"), svg::render(&chart).as_bytes())?;
    let canvas = raster::render(&chart);
    write_atomic(
        &dir.join("loss_curve.png"),
        &png::encode_rgb(canvas.width, canvas.height, &canvas.to_rgb8()),
    )
}

#[cfg(test)]
mod tests {
    use super::chart::{loss_chart, EVAL, PNG_SCALE, TRAIN};
    use super::*;

    /// 100 steps of falling loss, eval every 20 steps, no learning rate.
    fn run() -> Vec<Metrics> {
        let mut m = Vec::new();
        for step in 1..=100u64 {
            let s = step as f64;
            m.push(Metrics {
                step,
                loss: Some(2.0 + 1.0 / s + 0.05 * (s * 1.7).sin()),
                ..Metrics::default()
            });
            if step % 20 == 0 {
                m.push(Metrics {
                    step,
                    eval_loss: Some(2.1 + 1.0 / s),
                    ..Metrics::default()
                });
            }
        }
        m
    }

    /// Decodes `png` with the `png` crate: (width, height, RGB bytes).
    fn decode(png: &[u8]) -> (usize, usize, Vec<u8>) {
        let mut r = ::png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, ::png::ColorType::Rgb);
        assert_eq!(info.bit_depth, ::png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width as usize, info.height as usize, buf)
    }

    #[test]
    fn the_png_decodes_with_the_train_line_and_eval_markers_where_the_chart_puts_them() {
        let m = run();
        let bytes = loss_curve_png(&m);
        let (w, h, rgb) = decode(&bytes);
        assert_eq!((w, h), (1200, 675));
        let at = |x: f64, y: f64| {
            let (x, y) = ((x * PNG_SCALE) as usize, (y * PNG_SCALE) as usize);
            let i = (y * w + x) * 3;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        assert_eq!(at(0.0, 0.0), [255, 255, 255], "corner is background");
        assert_eq!(at(799.0, 449.0), [255, 255, 255], "corner is background");
        let chart = loss_chart(&m);
        let smooth = chart
            .series
            .iter()
            .find(|l| l.id == "train-smoothed")
            .unwrap();
        // Mid-segment points of the smoothed line (drawn opaque, 3 pixels wide) away from
        // the eval line.
        let eval = chart.series.iter().find(|l| l.id == "eval").unwrap();
        let mut checked = 0;
        for w2 in smooth.points.windows(2).skip(5).step_by(7) {
            let mid = ((w2[0].0 + w2[1].0) / 2.0, (w2[0].1 + w2[1].1) / 2.0);
            let near_eval = eval
                .points
                .iter()
                .any(|p| (p.0 - mid.0).abs() < 12.0 || (p.1 - mid.1).abs() < 3.0);
            if near_eval {
                continue;
            }
            let c = at(mid.0, mid.1);
            assert_eq!(c, [TRAIN.0, TRAIN.1, TRAIN.2], "train colour at {mid:?}");
            checked += 1;
        }
        assert!(checked >= 3, "{checked}");
        for &(x, y) in &eval.points {
            assert_eq!(at(x, y), [EVAL.0, EVAL.1, EVAL.2], "eval marker at {x},{y}");
        }
        // What the encoder wrote is what was drawn.
        let canvas = raster::render(&chart);
        assert_eq!(rgb, canvas.to_rgb8());
    }

    #[test]
    fn png_chunks_are_well_formed() {
        let bytes = super::png::encode_rgb(2, 1, &[255, 0, 0, 0, 0, 255]);
        assert_eq!(bytes[..8], super::png::SIGNATURE);
        let mut at = 8;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = &bytes[at + 4..at + 8];
            let data = &bytes[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(bytes[at + 8 + len..at + 12 + len].try_into().unwrap());
            let mut c = flate2::Crc::new();
            c.update(kind);
            c.update(data);
            assert_eq!(c.sum(), crc, "CRC of {:?}", std::str::from_utf8(kind));
            kinds.push(std::str::from_utf8(kind).unwrap().to_string());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        // IEND's CRC is the well-known AE 42 60 82 (checks the polynomial, not just agreement).
        assert_eq!(bytes[bytes.len() - 4..], [0xae, 0x42, 0x60, 0x82]);
        assert_eq!(decode(&bytes), (2, 1, vec![255, 0, 0, 0, 0, 255]));
    }
}
