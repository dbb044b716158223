//! Axis ranges and round tick values: 1, 2 or 5 × 10^k apart, labelled from integers so that
//! no float noise (`0.30000000000000004`) reaches a label.

/// One tick: where it sits on the axis and what it says.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tick {
    /// The value, as close to the label's decimal as an f64 gets.
    pub value: f64,
    /// The label: fixed-point with the step's decimals (`1.655`, `1.660`), or scientific
    /// (`2e-5`, `1.5e-4`) for values under 10⁻³ or from 10⁶.
    pub label: String,
}

/// The shown range of data from `lo` to `hi`: widened by `margin` of the span on each side,
/// and, when the data has no span (one value, or all equal), by 5% of the value (±1 around 0).
pub(crate) fn padded(lo: f64, hi: f64, margin: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= hi.abs().max(lo.abs()) * 1e-12 {
        let v = (lo + hi) / 2.0;
        let half = if v == 0.0 { 1.0 } else { v.abs() * 0.05 };
        return (v - half, v + half);
    }
    (lo - span * margin, hi + span * margin)
}

/// `10^e` as an exact integer (`e` ≥ 0, small).
fn pow10(e: i32) -> i64 {
    10i64.pow(e as u32)
}

/// `n × 10^e` as the nearest f64: for `e < 0` an exact integer over an exact power of ten, so
/// one rounding only.
fn value(n: i64, e: i32) -> f64 {
    if e >= 0 {
        n as f64 * 10f64.powi(e)
    } else {
        n as f64 / 10f64.powi(-e)
    }
}

/// `n × 10^e` written with `max(0, -e)` decimals, from the integers.
fn fixed(n: i64, e: i32) -> String {
    if e >= 0 {
        return (n * pow10(e)).to_string();
    }
    let d = (-e) as usize;
    let p = pow10(-e);
    let sign = if n < 0 { "-" } else { "" };
    let a = n.abs();
    format!("{sign}{}.{:0d$}", a / p, a % p)
}

/// `n × 10^e` in the shortest scientific form (`2e-5`, `1.5e-4`, `0`), from the integers.
fn scientific(mut n: i64, mut e: i32) -> String {
    if n == 0 {
        return "0".into();
    }
    while n % 10 == 0 {
        n /= 10;
        e += 1;
    }
    let sign = if n < 0 { "-" } else { "" };
    let digits = n.abs().to_string();
    let exp = e + digits.len() as i32 - 1;
    let mantissa = if digits.len() == 1 {
        digits
    } else {
        format!("{}.{}", &digits[..1], &digits[1..])
    };
    format!("{sign}{mantissa}e{exp}")
}

/// Round ticks inside `[lo, hi]`: the step among 1, 2 and 5 × 10^k whose tick count is nearest
/// `target` (the denser one on a tie), at least 1 when `integer` (steps are counted in whole
/// optimizer steps). An empty or non-finite range has no ticks.
pub(crate) fn nice_ticks(lo: f64, hi: f64, target: usize, integer: bool) -> Vec<Tick> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return Vec::new();
    }
    let target = target.max(2) as i64;
    let e0 = ((hi - lo) / target as f64).log10().floor() as i32;
    // (count, m, e, first k, last k): ticks at k·m·10^e.
    let mut best: Option<(i64, i64, i32, i64, i64)> = None;
    for e in e0 - 1..=e0 + 1 {
        if integer && e < 0 {
            continue;
        }
        for m in [1i64, 2, 5] {
            let step = value(m, e);
            // A tick on the edge counts even when the division lands a hair inside it.
            let k0 = (lo / step - 1e-9).ceil() as i64;
            let k1 = (hi / step + 1e-9).floor() as i64;
            let count = k1 - k0 + 1;
            if count < 1 {
                continue;
            }
            let better = match best {
                None => true,
                Some((c, ..)) => {
                    let (d, bd) = ((count - target).abs(), (c - target).abs());
                    d < bd || (d == bd && count > c)
                }
            };
            if better {
                best = Some((count, m, e, k0, k1));
            }
        }
    }
    let Some((_, m, e, k0, k1)) = best else {
        return Vec::new();
    };
    let largest = value(k0.abs().max(k1.abs()) * m, e);
    let sci = largest >= 1e6 || (largest > 0.0 && largest < 1e-3);
    (k0..=k1)
        .map(|k| {
            let n = k * m;
            Tick {
                value: value(n, e),
                label: if sci { scientific(n, e) } else { fixed(n, e) },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(t: &[Tick]) -> Vec<&str> {
        t.iter().map(|t| t.label.as_str()).collect()
    }

    /// Each label reads back as its value, and the values are evenly spaced by 1, 2 or 5 × 10^k.
    fn check(t: &[Tick], lo: f64, hi: f64) {
        for x in t {
            assert_eq!(x.label.parse::<f64>().unwrap(), x.value, "{x:?}");
            assert!(
                x.value >= lo - 1e-12 && x.value <= hi + 1e-12,
                "{x:?} in [{lo}, {hi}]"
            );
        }
        if t.len() >= 2 {
            let step = t[1].value - t[0].value;
            let mant = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .any(|m| (mant - m).abs() < 1e-6),
                "step {step}"
            );
        }
    }

    #[test]
    fn ticks_on_a_narrow_range_far_from_zero() {
        let t = nice_ticks(1.6558, 1.6723, 5, false);
        assert_eq!(labels(&t), ["1.660", "1.665", "1.670"]);
        check(&t, 1.6558, 1.6723);
    }

    #[test]
    fn ticks_on_tiny_values_are_scientific_and_exact() {
        let t = nice_ticks(0.0, 1e-4, 5, false);
        assert_eq!(labels(&t), ["0", "2e-5", "4e-5", "6e-5", "8e-5", "1e-4"]);
        check(&t, 0.0, 1e-4);
        let t = nice_ticks(0.0, 2.1e-4, 5, false);
        assert_eq!(labels(&t), ["0", "5e-5", "1e-4", "1.5e-4", "2e-4"]);
    }

    #[test]
    fn an_empty_range_is_widened_around_its_value() {
        let (lo, hi) = padded(2.3, 2.3, 0.05);
        assert!(lo < 2.3 && hi > 2.3);
        let t = nice_ticks(lo, hi, 5, false);
        assert_eq!(labels(&t), ["2.20", "2.25", "2.30", "2.35", "2.40"]);
        check(&t, lo, hi);
        assert_eq!(padded(0.0, 0.0, 0.05), (-1.0, 1.0));
        assert_eq!(padded(f64::NAN, 1.0, 0.05), (0.0, 1.0));
        assert!(nice_ticks(2.3, 2.3, 5, false).is_empty());
    }

    #[test]
    fn labels_carry_no_float_noise() {
        // 3 × 0.1 is 0.30000000000000004 in f64; the label is written from the integers.
        let t = nice_ticks(0.0, 0.7, 7, false);
        assert_eq!(
            labels(&t),
            ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
        );
        check(&t, 0.0, 0.7);
        let t = nice_ticks(-0.35, 0.25, 6, false);
        assert_eq!(labels(&t), ["-0.3", "-0.2", "-0.1", "0.0", "0.1", "0.2"]);
    }

    #[test]
    fn step_ticks_are_whole_numbers() {
        let t = nice_ticks(1.0, 200.0, 7, true);
        assert_eq!(
            labels(&t),
            ["20", "40", "60", "80", "100", "120", "140", "160", "180", "200"]
        );
        check(&t, 1.0, 200.0);
        let t = nice_ticks(0.5, 3.5, 10, true);
        assert_eq!(labels(&t), ["1", "2", "3"]);
        let t = nice_ticks(0.0, 100_000.0, 6, true);
        assert_eq!(
            labels(&t),
            ["0", "20000", "40000", "60000", "80000", "100000"]
        );
        let t = nice_ticks(0.0, 5e6, 5, false);
        assert_eq!(labels(&t), ["0", "1e6", "2e6", "3e6", "4e6", "5e6"]);
    }
}
