//! The loss curves (`loss_curve.svg`, `loss_curve.png`) from metrics series: what the SVG says,
//! that the PNG decodes, and the edge cases (one point, no eval, equal losses, NaN, no learning
//! rate, nothing, 10⁵ steps).

use qlora_rs::train::metrics::Metrics;
use qlora_rs::train::plot::{loss_curve_png, loss_curve_svg};

/// A deterministic noise in [-1, 1) (SplitMix64 of `i`).
fn noise(i: u64) -> f64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// A realistic run: `steps` steps of noisy falling loss, eval every `eval_every` steps, warmup
/// (10%) then cosine learning rate peaking at 2e-4.
fn run(steps: u64, eval_every: u64) -> Vec<Metrics> {
    let warmup = (steps / 10).max(1);
    let mut m = Vec::new();
    for step in 1..=steps {
        let t = step as f64 / steps as f64;
        let lr = if step <= warmup {
            2e-4 * step as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (steps - warmup) as f64;
            2e-4 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        m.push(Metrics {
            step,
            loss: Some(1.6 + 0.9 * (-6.0 * t).exp() + 0.12 * noise(step)),
            lr: Some(lr),
            ..Metrics::default()
        });
        if step % eval_every == 0 {
            m.push(Metrics {
                step,
                eval_loss: Some(1.72 + 0.8 * (-5.0 * t).exp()),
                ..Metrics::default()
            });
        }
    }
    m
}

/// The texts of the SVG elements of `class`.
fn texts(svg: &str, class: &str) -> Vec<String> {
    let open = format!("<text class=\"{class}\"");
    svg.lines()
        .filter(|l| l.starts_with(&open))
        .map(|l| {
            let start = l.find('>').unwrap() + 1;
            l[start..l.rfind("</text>").unwrap()].to_string()
        })
        .collect()
}

/// Decodes a PNG with the `png` crate: (width, height, RGB bytes).
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn the_svg_has_round_ticks_both_axes_and_a_legend() {
    let svg = loss_curve_svg(&run(200, 20));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(texts(&svg, "tick-x"), ["0", "50", "100", "150", "200"]);
    assert_eq!(
        texts(&svg, "tick-lr"),
        ["0", "5e-5", "1e-4", "1.5e-4", "2e-4"]
    );
    let loss = texts(&svg, "tick-loss");
    assert!(loss.len() >= 4, "{loss:?}");
    let values: Vec<f64> = loss.iter().map(|l| l.parse().unwrap()).collect();
    let step = values[1] - values[0];
    for (l, w) in loss.iter().zip(values.windows(2)) {
        assert!(l.len() <= 5, "short labels: {loss:?}");
        assert!(((w[1] - w[0]) - step).abs() < 1e-9, "even steps: {loss:?}");
    }
    assert_eq!(
        texts(&svg, "legend"),
        [
            "train loss (raw)",
            "smoothed (EMA 0.85)",
            "eval loss",
            "learning rate"
        ]
    );
    assert_eq!(texts(&svg, "title"), ["step", "loss", "learning rate"]);
    for id in ["train-raw", "train-smoothed", "eval", "eval-markers", "lr"] {
        assert!(svg.contains(&format!("id=\"{id}\"")), "{id}");
    }
    assert_eq!(
        svg.matches("<circle").count(),
        10 + 1,
        "10 evals and the legend's"
    );
    assert!(
        svg.contains("stroke-dasharray"),
        "the learning rate is dashed"
    );
    assert!(texts(&svg, "note").is_empty());
}

#[test]
fn the_png_decodes_to_the_chart() {
    let bytes = loss_curve_png(&run(200, 20));
    let (w, h, rgb) = decode(&bytes);
    assert_eq!((w, h), (1200, 675));
    assert_eq!(rgb[..3], [255, 255, 255], "top-left corner");
    // Some pixels carry each series' colour: train blue, eval orange, learning-rate green.
    for (name, c) in [
        ("train", [0x1f, 0x77, 0xb4]),
        ("eval", [0xe6, 0x55, 0x0d]),
        ("lr", [0x2c, 0x9c, 0x3c]),
    ] {
        let n = rgb.chunks(3).filter(|p| *p == c).count();
        assert!(n > 100, "{name}: {n} pixels");
    }
}

/// Runs at the edges: nothing, one point, one eval, no eval and no learning rate (and too
/// few points to smooth), all equal, NaN and infinite values.
fn edge_cases() -> Vec<(&'static str, Vec<Metrics>)> {
    let point = |step, loss: Option<f64>, eval: Option<f64>, lr: Option<f64>| Metrics {
        step,
        loss,
        eval_loss: eval,
        lr,
        ..Metrics::default()
    };
    vec![
        ("nothing", vec![]),
        ("one point", vec![point(1, Some(2.5), None, Some(1e-4))]),
        ("one eval", vec![point(0, None, Some(2.5), None)]),
        (
            "no eval, no lr",
            (1..=30)
                .map(|s| point(s, Some(3.0 / s as f64), None, None))
                .collect(),
        ),
        (
            "all equal",
            (1..=80)
                .map(|s| point(s, Some(2.3), Some(2.3), Some(0.0)))
                .collect(),
        ),
        (
            "non-finite",
            (1..=100)
                .map(|s| {
                    let l = match s {
                        7 => f64::NAN,
                        50 => f64::INFINITY,
                        _ => 2.0 - s as f64 / 100.0,
                    };
                    point(s, Some(l), (s == 60).then_some(f64::NAN), Some(1e-3))
                })
                .collect(),
        ),
    ]
}

#[test]
fn edge_cases_draw_without_nan_or_panic() {
    let cases = edge_cases();
    for (name, m) in &cases {
        let svg = loss_curve_svg(m);
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "{name}: {svg}"
        );
        assert!(!texts(&svg, "tick-x").is_empty(), "{name}: x ticks");
        assert!(texts(&svg, "tick-loss").len() >= 2, "{name}: loss ticks");
        let (w, h, _) = decode(&loss_curve_png(m));
        assert_eq!((w, h), (1200, 675), "{name}");
        let notes = texts(&svg, "note");
        match *name {
            "nothing" => assert_eq!(notes, ["no losses logged"]),
            "non-finite" => assert_eq!(
                notes,
                [
                    "2 non-finite train losses not drawn (steps 7, 50)",
                    "1 non-finite eval loss not drawn (step 60)"
                ]
            ),
            _ => assert!(notes.is_empty(), "{name}: {notes:?}"),
        }
        let lr_axis = !texts(&svg, "tick-lr").is_empty();
        let has_lr = m.iter().any(|m| m.lr.is_some());
        assert_eq!(
            lr_axis, has_lr,
            "{name}: a right axis exactly when there is a learning rate"
        );
    }
    // Fewer than 60 points: the train loss is one solid line, not smoothed.
    let svg = loss_curve_svg(&cases[3].1);
    assert_eq!(texts(&svg, "legend"), ["train loss"]);
    assert!(svg.contains("id=\"train\"") && !svg.contains("train-smoothed"));
    // Equal losses: the value itself is a tick.
    let svg = loss_curve_svg(&cases[4].1);
    assert!(texts(&svg, "tick-loss").contains(&"2.30".to_string()));
}

#[test]
fn a_long_run_is_thinned_for_drawing() {
    let m = run(100_000, 1000);
    let svg = loss_curve_svg(&m);
    assert!(svg.len() < 200_000, "SVG of {} bytes", svg.len());
    assert_eq!(
        texts(&svg, "tick-x"),
        ["0", "20000", "40000", "60000", "80000", "100000"]
    );
    assert!(texts(&svg, "legend").contains(&"smoothed (EMA 0.999)".to_string()));
    let png = loss_curve_png(&m);
    assert!(png.len() < 1_000_000, "PNG of {} bytes", png.len());
    decode(&png);
}

/// Writes the sample pictures for a person to look at: `$QLORA_PLOT_SAMPLES/loss_curve.*`.
#[test]
fn sample_pictures_when_asked() {
    let Some(dir) = std::env::var_os("QLORA_PLOT_SAMPLES") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let samples = [("loss_curve", run(200, 20)), ("long", run(100_000, 1000))];
    for (name, m) in samples.into_iter().chain(edge_cases()) {
        let name = name.replace([' ', ','], "_");
        std::fs::write(dir.join(format!("{name}.svg")), loss_curve_svg(&m)).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), loss_curve_png(&m)).unwrap();
    }
}
