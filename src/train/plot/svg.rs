//! The chart as an SVG document (text; browsers and editors draw it).

use std::fmt::Write;

use super::chart::{Anchor, Chart, Line, Text, BACKGROUND, FONT_SIZE, HEIGHT, WIDTH};

/// A coordinate to a tenth of a unit, without a trailing `.0`.
fn num(v: f64) -> String {
    let r = (v * 10.0).round() / 10.0;
    if r == 0.0 {
        "0".into()
    } else {
        r.to_string()
    }
}

/// `s` with `&`, `<`, `>` and `"` escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line: a polyline (two points or more) and its markers.
fn line(out: &mut String, l: &Line) {
    let s = &l.stroke;
    let id = |suffix: &str| {
        if l.id.is_empty() {
            String::new()
        } else {
            format!(" id=\"{}{suffix}\"", l.id)
        }
    };
    if l.points.len() >= 2 {
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|&(x, y)| format!("{},{}", num(x), num(y)))
            .collect();
        let _ = write!(
            out,
            "<polyline{} fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"",
            id(""),
            s.color.hex(),
            s.width
        );
        if s.opacity < 1.0 {
            let _ = write!(out, " stroke-opacity=\"{}\"", s.opacity);
        }
        if let Some((on, off)) = s.dash {
            let _ = write!(out, " stroke-dasharray=\"{on} {off}\"");
        }
        let _ = writeln!(
            out,
            " stroke-linejoin=\"round\" stroke-linecap=\"round\" points=\"{}\"/>",
            pts.join(" ")
        );
    }
    if let Some(r) = l.marker {
        // The fill reaches r, the white edge r to r + 1.
        let _ = writeln!(
            out,
            "<g{} fill=\"{}\" stroke=\"#ffffff\" stroke-width=\"1\">",
            id("-markers"),
            s.color.hex()
        );
        for &(x, y) in &l.points {
            let _ = writeln!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"{}\"/>",
                num(x),
                num(y),
                r + 0.5
            );
        }
        out.push_str("</g>\n");
    }
}

fn text(out: &mut String, t: &Text) {
    let anchor = match t.anchor {
        Anchor::Start => "start",
        Anchor::Middle => "middle",
        Anchor::End => "end",
    };
    let (x, y) = (num(t.x), num(t.y));
    let rotate = if t.vertical {
        format!(" transform=\"rotate(-90 {x} {y})\"")
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "<text class=\"{}\" x=\"{x}\" y=\"{y}\" text-anchor=\"{anchor}\" fill=\"{}\"{rotate}>{}</text>",
        t.class,
        t.color.hex(),
        escape(&t.text)
    );
}

/// `chart` as an SVG document.
pub(crate) fn render(chart: &Chart) -> String {
    let p = &chart.plot;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"Helvetica, Arial, sans-serif\" \
         font-size=\"{FONT_SIZE}\">"
    );
    let _ = writeln!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"{}\"/>",
        BACKGROUND.hex()
    );
    let _ = writeln!(
        out,
        "<defs><clipPath id=\"plot-area\"><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/></clipPath></defs>",
        num(p.left),
        num(p.top),
        num(p.right - p.left),
        num(p.bottom - p.top)
    );
    for (id, lines, clip) in [
        ("grid", &chart.grid, false),
        ("series", &chart.series, true),
        ("axes", &chart.frame, false),
        ("legend", &chart.legend, false),
    ] {
        let clip = if clip {
            " clip-path=\"url(#plot-area)\""
        } else {
            ""
        };
        let _ = writeln!(out, "<g id=\"{id}\"{clip}>");
        for l in lines {
            line(&mut out, l);
        }
        out.push_str("</g>\n");
    }
    for t in &chart.texts {
        text(&mut out, t);
    }
    out.push_str("</svg>\n");
    out
}
