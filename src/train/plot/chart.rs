//! The chart, computed once for both pictures: the axes and their round ticks, every series in
//! drawing coordinates (the SVG's user units, 800 × 450; the PNG scales them by
//! [`PNG_SCALE`]), the legend and the notes. The renderers only draw what is here.

use super::font;
use super::series::{decimate, ema, extent, smoothing_weight, Series};
use super::ticks::{nice_ticks, padded, Tick};
use crate::train::metrics::Metrics;

/// Width of the chart, in drawing units.
pub(crate) const WIDTH: f64 = 800.0;
/// Height of the chart, in drawing units.
pub(crate) const HEIGHT: f64 = 450.0;
/// PNG pixels per drawing unit (1200 × 675 pixels).
pub(crate) const PNG_SCALE: f64 = 1.5;
/// PNG pixels per pixel of the bitmap font (a 5×7 glyph is 10×14 pixels).
pub(crate) const FONT_PIXEL: usize = 2;
/// Font size of the SVG's text, in drawing units.
pub(crate) const FONT_SIZE: f64 = 13.0;
/// Width of a character for the layout: the bitmap font's advance (the SVG's sans-serif is
/// narrower, so what fits in the PNG fits in both).
pub(crate) const CHAR_W: f64 = (font::ADVANCE * FONT_PIXEL) as f64 / PNG_SCALE;
/// Height of digits and capitals above the baseline.
pub(crate) const CAP_H: f64 = (font::ASCENT * FONT_PIXEL) as f64 / PNG_SCALE;

/// A colour, 8 bits a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// The page.
pub(crate) const BACKGROUND: Rgb = Rgb(255, 255, 255);
/// Tick labels and axis titles.
pub(crate) const TEXT: Rgb = Rgb(0x33, 0x33, 0x33);
/// Axis lines and tick marks.
pub(crate) const AXIS: Rgb = Rgb(0x66, 0x66, 0x66);
/// Guide lines at the ticks.
pub(crate) const GRID: Rgb = Rgb(0xe8, 0xe8, 0xe8);
/// The train loss, raw (faint) and smoothed.
pub(crate) const TRAIN: Rgb = Rgb(0x1f, 0x77, 0xb4);
/// The eval loss.
pub(crate) const EVAL: Rgb = Rgb(0xe6, 0x55, 0x0d);
/// The learning rate and its axis title.
pub(crate) const LR: Rgb = Rgb(0x2c, 0x9c, 0x3c);
/// Notes about what is not drawn.
pub(crate) const NOTE: Rgb = Rgb(0xb0, 0x20, 0x20);

/// How a line is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stroke {
    /// Colour.
    pub color: Rgb,
    /// Width, in drawing units.
    pub width: f64,
    /// 1 opaque, 0 invisible.
    pub opacity: f64,
    /// Dashes: (drawn, gap) lengths in drawing units; `None` solid.
    pub dash: Option<(f64, f64)>,
}

impl Stroke {
    const fn solid(color: Rgb, width: f64) -> Stroke {
        Stroke {
            color,
            width,
            opacity: 1.0,
            dash: None,
        }
    }
}

/// A polyline, with a filled circle (white-edged) at each point when `marker` gives a radius.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Line {
    /// The SVG element's id (`train-raw`, `train-smoothed`, `eval`, `lr`); empty for none.
    pub id: &'static str,
    /// How the line is drawn.
    pub stroke: Stroke,
    /// Points in drawing coordinates (y down).
    pub points: Vec<(f64, f64)>,
    /// Radius of the circles at the points, if any.
    pub marker: Option<f64>,
}

impl Line {
    fn segment(stroke: Stroke, a: (f64, f64), b: (f64, f64)) -> Line {
        Line {
            id: "",
            stroke,
            points: vec![a, b],
            marker: None,
        }
    }
}

/// Where a text's `x` is: its start, middle or end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// `x` is the left end.
    Start,
    /// `x` is the middle.
    Middle,
    /// `x` is the right end.
    End,
}

/// A line of text.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Text {
    /// What it is, as the SVG's class: `tick-x`, `tick-loss`, `tick-lr`, `title`, `legend`,
    /// `note`.
    pub class: &'static str,
    /// Anchor point: `x` as `anchor` says, `y` on the baseline.
    pub x: f64,
    /// Baseline.
    pub y: f64,
    /// The text (printable ASCII: the PNG's font has no more).
    pub text: String,
    /// Which end of the text `x` is.
    pub anchor: Anchor,
    /// Colour.
    pub color: Rgb,
    /// Turned a quarter counter-clockwise about (x, y), read bottom to top (a y-axis title).
    pub vertical: bool,
}

/// A rectangle in drawing coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rect {
    /// Left edge.
    pub left: f64,
    /// Top edge.
    pub top: f64,
    /// Right edge.
    pub right: f64,
    /// Bottom edge.
    pub bottom: f64,
}

/// Everything both pictures draw, back to front: grid, series (clipped to `plot`), frame,
/// legend swatches, texts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Chart {
    /// The data area.
    pub plot: Rect,
    /// Guide lines at the ticks.
    pub grid: Vec<Line>,
    /// The data: learning rate, raw train loss, smoothed train loss, eval loss.
    pub series: Vec<Line>,
    /// Axis lines and tick marks.
    pub frame: Vec<Line>,
    /// The legend's sample lines and markers.
    pub legend: Vec<Line>,
    /// Tick labels, axis titles, legend labels and notes.
    pub texts: Vec<Text>,
}

/// Layout width of `s`.
fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_W
}

/// The widest label among `ticks`.
fn widest(ticks: &[Tick]) -> f64 {
    ticks
        .iter()
        .map(|t| text_width(&t.label))
        .fold(0.0, f64::max)
}

/// Eval points with a marker each up to this many; a line alone beyond.
const MAX_MARKERS: usize = 50;
/// Gap between an axis and its tick labels, tick marks included.
const TICK_GAP: f64 = 8.0;
/// Length of a tick mark.
const TICK_LEN: f64 = 5.0;
/// Distance from the page's edge to an axis title or the legend.
const EDGE: f64 = 10.0;
/// Baseline-to-baseline distance of the legend's rows and the notes.
const ROW: f64 = 20.0;

/// "3 non-finite train losses not drawn (steps 5, 9, 12)", listing at most five steps.
fn skipped_note(what: &str, steps: &[u64]) -> String {
    let n = steps.len();
    let mut list: Vec<String> = steps.iter().take(5).map(|s| s.to_string()).collect();
    if n > 5 {
        list.push("...".into());
    }
    let what = match (n, what.ends_with('s')) {
        (1, _) => what.to_string(),
        (_, true) => format!("{what}es"),
        (_, false) => format!("{what}s"),
    };
    let s = if n == 1 { "" } else { "s" };
    format!(
        "{n} non-finite {what} not drawn (step{s} {})",
        list.join(", ")
    )
}

/// The chart of `metrics`: train loss (faint raw line, smoothed line over it), eval loss
/// (markers, joined), learning rate on the right axis, legend, and notes for what is not drawn.
pub(crate) fn loss_chart(metrics: &[Metrics]) -> Chart {
    let train = Series::from_metrics(metrics, |m| m.loss);
    let eval = Series::from_metrics(metrics, |m| m.eval_loss);
    let lr = Series::from_metrics(metrics, |m| m.lr);

    // Ranges: steps with 1.5% each side (a marker on the last step stays whole), losses with
    // 5% each side, the learning rate from 0 with 5% above.
    let steps = extent(
        [train.step_range(), eval.step_range(), lr.step_range()]
            .into_iter()
            .flatten()
            .flat_map(|(a, b)| [a, b]),
    );
    let (x0, x1) = match steps {
        None => (0.0, 1.0),
        Some((a, b)) if a == b => (a - 1.0, b + 1.0),
        Some((a, b)) => padded(a, b, 0.015),
    };
    let losses = extent(
        [train.value_range(), eval.value_range()]
            .into_iter()
            .flatten()
            .flat_map(|(a, b)| [a, b]),
    );
    let (y0, y1) = match losses {
        None => (0.0, 1.0),
        Some((a, b)) => padded(a, b, 0.05),
    };
    let lr_range = lr.value_range().map(|(lo, hi)| {
        let lo = lo.min(0.0);
        if hi > lo {
            (lo, hi + (hi - lo) * 0.05)
        } else if hi == 0.0 {
            (0.0, 1.0)
        } else {
            padded(lo, hi, 0.05)
        }
    });
    let y_ticks = nice_ticks(y0, y1, 6, false);
    let lr_ticks = lr_range
        .map(|(a, b)| nice_ticks(a, b, 6, false))
        .unwrap_or_default();

    // Legend entries: (sample line, label).
    let weight = smoothing_weight(train.points.len());
    let raw_stroke = Stroke {
        opacity: if weight > 0.0 { 0.3 } else { 1.0 },
        width: if weight > 0.0 { 1.0 } else { 2.0 },
        ..Stroke::solid(TRAIN, 1.0)
    };
    let smooth_stroke = Stroke::solid(TRAIN, 2.0);
    let eval_stroke = Stroke::solid(EVAL, 1.5);
    let lr_stroke = Stroke {
        dash: Some((6.0, 4.0)),
        ..Stroke::solid(LR, 1.5)
    };
    let eval_marker = (eval.points.len() <= MAX_MARKERS).then_some(3.5);
    let mut entries: Vec<(Stroke, Option<f64>, String)> = Vec::new();
    if !train.points.is_empty() {
        if weight > 0.0 {
            entries.push((raw_stroke, None, "train loss (raw)".into()));
            entries.push((smooth_stroke, None, format!("smoothed (EMA {weight})")));
        } else {
            entries.push((raw_stroke, None, "train loss".into()));
        }
    }
    if !eval.points.is_empty() {
        entries.push((eval_stroke, eval_marker, "eval loss".into()));
    }
    if !lr.points.is_empty() {
        entries.push((lr_stroke, None, "learning rate".into()));
    }
    let mut notes = Vec::new();
    if train.points.is_empty() && eval.points.is_empty() {
        notes.push("no losses logged".to_string());
    }
    for (what, s) in [
        ("train loss", &train),
        ("eval loss", &eval),
        ("learning rate", &lr),
    ] {
        if !s.skipped.is_empty() {
            notes.push(skipped_note(what, &s.skipped));
        }
    }

    // Margins: room for the tick labels and the axis titles.
    let left = EDGE + CAP_H + 12.0 + widest(&y_ticks) + TICK_GAP;
    let right = if lr_range.is_some() {
        TICK_GAP + widest(&lr_ticks) + 12.0 + CAP_H + EDGE
    } else {
        24.0
    };
    // The legend's rows, left to right from the plot's left edge.
    const SAMPLE: f64 = 24.0;
    let mut placed = Vec::new();
    let (mut x, mut row) = (left, 0usize);
    for (stroke, marker, label) in entries {
        let w = SAMPLE + 6.0 + text_width(&label);
        if x > left && x + w > WIDTH - EDGE {
            x = left;
            row += 1;
        }
        placed.push((x, row, stroke, marker, label));
        x += w + 22.0;
    }
    let rows = if placed.is_empty() { 0 } else { row + 1 } + notes.len();
    let first_baseline = EDGE + CAP_H + 4.0;
    let top = first_baseline + (rows.max(1) - 1) as f64 * ROW + 16.0;
    let bottom = HEIGHT - (TICK_GAP + CAP_H + 14.0 + CAP_H + EDGE);
    let plot = Rect {
        left,
        top,
        right: WIDTH - right,
        bottom,
    };
    let (pw, ph) = (plot.right - plot.left, plot.bottom - plot.top);
    let sx = |x: f64| plot.left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| plot.bottom - (y - y0) / (y1 - y0) * ph;
    let x_ticks = nice_ticks(x0, x1, (pw / 100.0).round() as usize, true);

    let mut chart = Chart {
        plot,
        grid: Vec::new(),
        series: Vec::new(),
        frame: Vec::new(),
        legend: Vec::new(),
        texts: Vec::new(),
    };
    let text = |class, x, y, s: &str, anchor, color| Text {
        class,
        x,
        y,
        text: s.to_string(),
        anchor,
        color,
        vertical: false,
    };

    // Grid, axes, ticks and their labels.
    let grid = Stroke::solid(GRID, 1.0);
    let axis = Stroke::solid(AXIS, 1.0);
    for t in &x_ticks {
        let x = sx(t.value);
        chart
            .grid
            .push(Line::segment(grid, (x, plot.top), (x, plot.bottom)));
        chart.frame.push(Line::segment(
            axis,
            (x, plot.bottom),
            (x, plot.bottom + TICK_LEN),
        ));
        chart.texts.push(text(
            "tick-x",
            x,
            plot.bottom + TICK_GAP + 4.0 + CAP_H,
            &t.label,
            Anchor::Middle,
            TEXT,
        ));
    }
    for t in &y_ticks {
        let y = sy(t.value);
        chart
            .grid
            .push(Line::segment(grid, (plot.left, y), (plot.right, y)));
        chart.frame.push(Line::segment(
            axis,
            (plot.left - TICK_LEN, y),
            (plot.left, y),
        ));
        chart.texts.push(text(
            "tick-loss",
            plot.left - TICK_GAP,
            y + CAP_H / 2.0,
            &t.label,
            Anchor::End,
            TEXT,
        ));
    }
    chart.frame.push(Line::segment(
        axis,
        (plot.left, plot.top),
        (plot.left, plot.bottom),
    ));
    chart.frame.push(Line::segment(
        axis,
        (plot.left, plot.bottom),
        (plot.right, plot.bottom),
    ));
    chart.texts.push(text(
        "title",
        (plot.left + plot.right) / 2.0,
        HEIGHT - EDGE,
        "step",
        Anchor::Middle,
        TEXT,
    ));
    chart.texts.push(Text {
        vertical: true,
        ..text(
            "title",
            EDGE + CAP_H,
            (plot.top + plot.bottom) / 2.0,
            "loss",
            Anchor::Middle,
            TEXT,
        )
    });

    // Learning rate: right axis, drawn first so the losses lie over it.
    if let Some((l0, l1)) = lr_range {
        let sl = |v: f64| plot.bottom - (v - l0) / (l1 - l0) * ph;
        chart.frame.push(Line::segment(
            axis,
            (plot.right, plot.top),
            (plot.right, plot.bottom),
        ));
        for t in &lr_ticks {
            let y = sl(t.value);
            chart.frame.push(Line::segment(
                axis,
                (plot.right, y),
                (plot.right + TICK_LEN, y),
            ));
            chart.texts.push(text(
                "tick-lr",
                plot.right + TICK_GAP,
                y + CAP_H / 2.0,
                &t.label,
                Anchor::Start,
                TEXT,
            ));
        }
        chart.texts.push(Text {
            vertical: true,
            ..text(
                "title",
                WIDTH - EDGE,
                (plot.top + plot.bottom) / 2.0,
                "learning rate",
                Anchor::Middle,
                Rgb(0x1e, 0x6e, 0x2a),
            )
        });
        let pts: Vec<(f64, f64)> = lr.points.iter().map(|&(x, v)| (sx(x), sl(v))).collect();
        chart
            .series
            .push(series_line("lr", lr_stroke, pts, None, &plot));
    }

    // Train loss: raw (faint when smoothed) and smoothed over it.
    let raw: Vec<(f64, f64)> = train.points.iter().map(|&(x, v)| (sx(x), sy(v))).collect();
    if !raw.is_empty() {
        let id = if weight > 0.0 { "train-raw" } else { "train" };
        chart
            .series
            .push(series_line(id, raw_stroke, raw.clone(), None, &plot));
    }
    if weight > 0.0 {
        let values: Vec<f64> = train.points.iter().map(|p| p.1).collect();
        let pts = train
            .points
            .iter()
            .zip(ema(&values, weight))
            .map(|(&(x, _), s)| (sx(x), sy(s)))
            .collect();
        chart.series.push(series_line(
            "train-smoothed",
            smooth_stroke,
            pts,
            None,
            &plot,
        ));
    }
    // Eval loss: markers, joined.
    if !eval.points.is_empty() {
        let pts = eval.points.iter().map(|&(x, v)| (sx(x), sy(v))).collect();
        chart
            .series
            .push(series_line("eval", eval_stroke, pts, eval_marker, &plot));
    }

    // Legend and notes.
    for (x, row, stroke, marker, label) in placed {
        let y = first_baseline + row as f64 * ROW;
        let mid = y - CAP_H / 2.0;
        chart.legend.push(Line {
            id: "",
            stroke: Stroke {
                // The faint raw line's sample is drawn a little stronger, to be seen.
                opacity: stroke.opacity.max(0.45),
                ..stroke
            },
            points: vec![(x, mid), (x + SAMPLE, mid)],
            marker: None,
        });
        if let Some(r) = marker {
            chart.legend.push(Line {
                id: "",
                stroke,
                points: vec![(x + SAMPLE / 2.0, mid)],
                marker: Some(r),
            });
        }
        chart.texts.push(text(
            "legend",
            x + SAMPLE + 6.0,
            y,
            &label,
            Anchor::Start,
            TEXT,
        ));
    }
    let legend_rows = rows - notes.len();
    for (i, note) in notes.iter().enumerate() {
        chart.texts.push(text(
            "note",
            left,
            first_baseline + (legend_rows + i) as f64 * ROW,
            note,
            Anchor::Start,
            NOTE,
        ));
    }
    chart
}

/// A series as drawn: thinned to four points a column of the plot, and marked when it has a
/// single point (a line through one point draws nothing).
fn series_line(
    id: &'static str,
    stroke: Stroke,
    points: Vec<(f64, f64)>,
    marker: Option<f64>,
    plot: &Rect,
) -> Line {
    let columns = (plot.right - plot.left).round() as usize;
    let points = decimate(&points, plot.left, plot.right, columns);
    let marker = if points.len() == 1 {
        Some(marker.unwrap_or(3.0))
    } else {
        marker
    };
    Line {
        id,
        stroke,
        points,
        marker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_what_is_not_drawn() {
        assert_eq!(
            skipped_note("train loss", &[5]),
            "1 non-finite train loss not drawn (step 5)"
        );
        assert_eq!(
            skipped_note("learning rate", &[1, 2, 3, 4, 5, 6, 7]),
            "7 non-finite learning rates not drawn (steps 1, 2, 3, 4, 5, ...)"
        );
    }
}
