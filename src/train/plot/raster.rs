//! The chart as pixels: anti-aliased lines of a given width (coverage from the distance to
//! each segment), filled circles, crisp axis-aligned lines, and text in the bitmap font.

use super::chart::{
    Anchor, Chart, Line, Rgb, Stroke, Text, BACKGROUND, FONT_PIXEL, HEIGHT, PNG_SCALE, WIDTH,
};
use super::font;

/// An RGB image, blended in f32 and stored as 8 bits a channel at the end.
pub(crate) struct Canvas {
    /// Pixels across.
    pub width: usize,
    /// Pixels down.
    pub height: usize,
    px: Vec<[f32; 3]>,
}

/// A pixel rectangle `[x0, x1) × [y0, y1)`.
#[derive(Clone, Copy, Debug)]
struct Clip {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Clip {
    fn and(self, o: Clip) -> Clip {
        Clip {
            x0: self.x0.max(o.x0),
            y0: self.y0.max(o.y0),
            x1: self.x1.min(o.x1),
            y1: self.y1.min(o.y1),
        }
    }

    fn is_empty(&self) -> bool {
        self.x0 >= self.x1 || self.y0 >= self.y1
    }
}

/// Distance from `p` to the segment `a`–`b`.
fn distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (qx, qy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    (qx * qx + qy * qy).sqrt()
}

/// `points` cut into the drawn pieces of a (drawn, gap) dash pattern, measured along the line.
fn dashes(points: &[(f64, f64)], on: f64, off: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let Some(&first) = points.first() else {
        return out;
    };
    if on <= 0.0 || off <= 0.0 {
        return vec![points.to_vec()];
    }
    let mut cur = vec![first];
    let (mut drawing, mut left) = (true, on);
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        let mut t = 0.0;
        while len - t > left {
            t += left;
            let p = (a.0 + (b.0 - a.0) * t / len, a.1 + (b.1 - a.1) * t / len);
            if drawing {
                cur.push(p);
                out.push(std::mem::take(&mut cur));
            } else {
                cur = vec![p];
            }
            drawing = !drawing;
            left = if drawing { on } else { off };
        }
        left -= len - t;
        if drawing {
            cur.push(b);
        }
    }
    if drawing && cur.len() >= 2 {
        out.push(cur);
    }
    out
}

impl Canvas {
    /// A `width` × `height` canvas filled with `bg`.
    pub fn new(width: usize, height: usize, bg: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            px: vec![[bg.0 as f32, bg.1 as f32, bg.2 as f32]; width * height],
        }
    }

    fn whole(&self) -> Clip {
        Clip {
            x0: 0,
            y0: 0,
            x1: self.width as i64,
            y1: self.height as i64,
        }
    }

    /// Mixes `c` into pixel (x, y) with weight `a` (0 leaves it, 1 replaces it).
    fn blend(&mut self, x: i64, y: i64, c: Rgb, a: f32) {
        if a <= 0.0 || x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let p = &mut self.px[y as usize * self.width + x as usize];
        let a = a.min(1.0);
        for (ch, v) in p.iter_mut().zip([c.0, c.1, c.2]) {
            *ch += (v as f32 - *ch) * a;
        }
    }

    /// Fills the pixels `[x0, x1) × [y0, y1)` with `c` at opacity `a`.
    fn fill_rect(&mut self, r: Clip, c: Rgb, a: f32) {
        let r = r.and(self.whole());
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                self.blend(x, y, c, a);
            }
        }
    }

    /// A polyline (pixel coordinates) of `width` pixels, anti-aliased: each pixel is covered by
    /// how far its centre lies inside the line's edge (a one-pixel ramp), the largest coverage
    /// over the segments, so joints and overlaps of a translucent line are not darker.
    fn stroke(&mut self, points: &[(f64, f64)], width: f64, s: &Stroke, dash: f64, clip: Clip) {
        if points.is_empty() {
            return;
        }
        let pieces = match s.dash {
            Some((on, off)) => dashes(points, on * dash, off * dash),
            None => vec![points.to_vec()],
        };
        let hw = width / 2.0;
        let pad = hw + 1.0;
        let (mut bx0, mut by0, mut bx1, mut by1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for &(x, y) in points {
            bx0 = bx0.min(x);
            by0 = by0.min(y);
            bx1 = bx1.max(x);
            by1 = by1.max(y);
        }
        let area = Clip {
            x0: (bx0 - pad).floor() as i64,
            y0: (by0 - pad).floor() as i64,
            x1: (bx1 + pad).ceil() as i64 + 1,
            y1: (by1 + pad).ceil() as i64 + 1,
        }
        .and(clip)
        .and(self.whole());
        if area.is_empty() {
            return;
        }
        let bw = (area.x1 - area.x0) as usize;
        let mut cover = vec![0f32; bw * (area.y1 - area.y0) as usize];
        for piece in &pieces {
            let segs: Vec<((f64, f64), (f64, f64))> = if piece.len() == 1 {
                vec![(piece[0], piece[0])]
            } else {
                piece.windows(2).map(|w| (w[0], w[1])).collect()
            };
            for (a, b) in segs {
                let seg = Clip {
                    x0: (a.0.min(b.0) - pad).floor() as i64,
                    y0: (a.1.min(b.1) - pad).floor() as i64,
                    x1: (a.0.max(b.0) + pad).ceil() as i64 + 1,
                    y1: (a.1.max(b.1) + pad).ceil() as i64 + 1,
                }
                .and(area);
                for y in seg.y0..seg.y1 {
                    for x in seg.x0..seg.x1 {
                        let d = distance((x as f64 + 0.5, y as f64 + 0.5), a, b);
                        let c = (hw + 0.5 - d).clamp(0.0, 1.0).min(width) as f32;
                        let i = (y - area.y0) as usize * bw + (x - area.x0) as usize;
                        cover[i] = cover[i].max(c);
                    }
                }
            }
        }
        let opacity = s.opacity as f32;
        for y in area.y0..area.y1 {
            for x in area.x0..area.x1 {
                let c = cover[(y - area.y0) as usize * bw + (x - area.x0) as usize];
                self.blend(x, y, s.color, c * opacity);
            }
        }
    }

    /// A filled disc of radius `r` pixels, anti-aliased.
    fn disc(&mut self, cx: f64, cy: f64, r: f64, c: Rgb, clip: Clip) {
        let area = Clip {
            x0: (cx - r - 1.0).floor() as i64,
            y0: (cy - r - 1.0).floor() as i64,
            x1: (cx + r + 1.0).ceil() as i64 + 1,
            y1: (cy + r + 1.0).ceil() as i64 + 1,
        }
        .and(clip);
        for y in area.y0..area.y1 {
            for x in area.x0..area.x1 {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                self.blend(x, y, c, (r + 0.5 - d).clamp(0.0, 1.0) as f32);
            }
        }
    }

    /// A horizontal or vertical line on whole pixels (no blur); false for any other line.
    fn crisp(&mut self, l: &Line, scale: f64) -> bool {
        let [a, b] = l.points[..] else {
            return false;
        };
        if l.stroke.dash.is_some() || (a.0 != b.0 && a.1 != b.1) {
            return false;
        }
        let w = (l.stroke.width * scale).round().max(1.0);
        let span = |p: f64, q: f64| {
            let (lo, hi) = (p.min(q) * scale, p.max(q) * scale);
            ((lo - w / 2.0).round() as i64, (hi + w / 2.0).round() as i64)
        };
        let across = |p: f64| {
            let s = (p * scale - w / 2.0).round() as i64;
            (s, s + w as i64)
        };
        let ((x0, x1), (y0, y1)) = if a.1 == b.1 {
            (span(a.0, b.0), across(a.1))
        } else {
            (across(a.0), span(a.1, b.1))
        };
        self.fill_rect(
            Clip { x0, y0, x1, y1 },
            l.stroke.color,
            l.stroke.opacity as f32,
        );
        true
    }

    /// A chart line (drawing units): crisp when axis-aligned, else anti-aliased; then its
    /// markers (a white edge one unit wide around the coloured disc).
    fn line(&mut self, l: &Line, scale: f64, clip: Clip) {
        if l.points.len() >= 2 && !self.crisp(l, scale) {
            let pts: Vec<(f64, f64)> = l
                .points
                .iter()
                .map(|&(x, y)| (x * scale, y * scale))
                .collect();
            self.stroke(&pts, l.stroke.width * scale, &l.stroke, scale, clip);
        }
        if let Some(r) = l.marker {
            for &(x, y) in &l.points {
                let (cx, cy) = (x * scale, y * scale);
                self.disc(cx, cy, (r + 1.0) * scale, BACKGROUND, clip);
                self.disc(cx, cy, r * scale, l.stroke.color, clip);
            }
        }
    }

    /// `t` in the bitmap font, each font pixel a `FONT_PIXEL`-pixel square on whole pixels.
    fn text(&mut self, t: &Text, scale: f64) {
        let p = FONT_PIXEL as i64;
        let chars: Vec<char> = t.text.chars().collect();
        let w = (chars.len() * font::ADVANCE) as i64 * p - p;
        let start = match t.anchor {
            Anchor::Start => 0,
            Anchor::Middle => -w / 2,
            Anchor::End => -w,
        };
        let (ax, ay) = ((t.x * scale).round() as i64, (t.y * scale).round() as i64);
        for (i, &c) in chars.iter().enumerate() {
            let g = font::glyph(c);
            for (r, bits) in g.iter().enumerate() {
                for col in 0..font::COLS {
                    if bits & (1 << (font::COLS - 1 - col)) == 0 {
                        continue;
                    }
                    // The font pixel's top-left corner from the anchor, text laid left to right.
                    let dx = start + (i * font::ADVANCE + col) as i64 * p;
                    let dy = (r as i64 - font::ASCENT as i64) * p;
                    let (x0, y0) = if t.vertical {
                        // A quarter turn counter-clockwise: (dx, dy) → (dy, −dx).
                        (ax + dy, ay - dx - p)
                    } else {
                        (ax + dx, ay + dy)
                    };
                    self.fill_rect(
                        Clip {
                            x0,
                            y0,
                            x1: x0 + p,
                            y1: y0 + p,
                        },
                        t.color,
                        1.0,
                    );
                }
            }
        }
    }

    /// The colour of pixel (x, y).
    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        self.px[y * self.width + x].map(|v| v.round().clamp(0.0, 255.0) as u8)
    }

    /// The pixels, row by row, 3 bytes each.
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.px
            .iter()
            .flat_map(|p| p.map(|v| v.round().clamp(0.0, 255.0) as u8))
            .collect()
    }
}

/// `chart` drawn at [`PNG_SCALE`] pixels per unit.
pub(crate) fn render(chart: &Chart) -> Canvas {
    let s = PNG_SCALE;
    let mut c = Canvas::new(
        (WIDTH * s).round() as usize,
        (HEIGHT * s).round() as usize,
        BACKGROUND,
    );
    let all = c.whole();
    let p = &chart.plot;
    let plot = Clip {
        x0: (p.left * s).round() as i64,
        y0: (p.top * s).round() as i64,
        x1: (p.right * s).round() as i64 + 1,
        y1: (p.bottom * s).round() as i64 + 1,
    };
    for l in &chart.grid {
        c.line(l, s, all);
    }
    for l in &chart.series {
        c.line(l, s, plot);
    }
    for l in chart.frame.iter().chain(&chart.legend) {
        c.line(l, s, all);
    }
    for t in &chart.texts {
        c.text(t, s);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashes_alternate_along_the_line() {
        let d = dashes(&[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)], 6.0, 4.0);
        assert_eq!(
            d,
            vec![vec![(0.0, 0.0), (6.0, 0.0)], vec![(10.0, 0.0), (10.0, 6.0)],]
        );
    }

    #[test]
    fn a_thick_line_covers_its_middle_and_fades_at_its_edge() {
        let mut c = Canvas::new(20, 20, Rgb(255, 255, 255));
        let s = Stroke {
            color: Rgb(0, 0, 0),
            width: 3.0,
            opacity: 1.0,
            dash: None,
        };
        c.stroke(&[(2.0, 10.0), (18.0, 10.0)], 3.0, &s, 1.0, c.whole());
        // Rows 9 and 10 have their centres 0.5 from the line: inside. Row 8 (1.5 away) is on
        // the edge: half covered. Row 6 is outside.
        assert_eq!(c.pixel(10, 9), [0, 0, 0]);
        assert_eq!(c.pixel(10, 10), [0, 0, 0]);
        assert_eq!(c.pixel(10, 8), [128, 128, 128]);
        assert_eq!(c.pixel(10, 6), [255, 255, 255]);
    }
}
