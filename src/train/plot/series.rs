//! The data of the chart: series taken from `metrics.jsonl`, the smoothing of the train loss,
//! and the thinning of long series for drawing.

use crate::train::metrics::Metrics;

/// One quantity against the step: its finite values, and the steps of those left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Series {
    /// (step, value), in step order; finite values only.
    pub points: Vec<(f64, f64)>,
    /// Steps whose value was NaN or infinite (not drawn).
    pub skipped: Vec<u64>,
}

impl Series {
    /// The values `get` finds in `metrics`, sorted by step (a stable sort: a log written in
    /// order stays as written).
    pub fn from_metrics(metrics: &[Metrics], get: impl Fn(&Metrics) -> Option<f64>) -> Series {
        let mut s = Series::default();
        for m in metrics {
            match get(m) {
                Some(v) if v.is_finite() => s.points.push((m.step as f64, v)),
                Some(_) => s.skipped.push(m.step),
                None => {}
            }
        }
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    }

    /// The smallest and largest value, if any.
    pub fn value_range(&self) -> Option<(f64, f64)> {
        extent(self.points.iter().map(|p| p.1))
    }

    /// The first and last step, if any.
    pub fn step_range(&self) -> Option<(f64, f64)> {
        extent(self.points.iter().map(|p| p.0))
    }
}

/// The smallest and largest of `values`, if any.
pub(crate) fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
    })
}

/// The smoothing weight for `n` train-loss points: `1 − 30/n` to three decimals (a memory of
/// about n/30 points, so the smoothed line has the same look on 200 steps as on 100 000), at
/// most 0.999; 0 (no smoothing) under 60 points.
pub(crate) fn smoothing_weight(n: usize) -> f64 {
    if n < 60 {
        return 0.0;
    }
    ((1.0 - 30.0 / n as f64) * 1000.0).round().min(999.0) / 1000.0
}

/// TensorBoard's smoothing: an exponential moving average with `weight` on the past,
/// debiased (divided by `1 − weight^i` at the i-th value) so the line starts at the first
/// value instead of rising from 0. `weight` 0 returns the values.
pub(crate) fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut w_pow = 1.0;
    values
        .iter()
        .map(|&v| {
            acc = acc * weight + (1.0 - weight) * v;
            w_pow *= weight;
            acc / (1.0 - w_pow)
        })
        .collect()
}

/// `points` (in x order, drawing coordinates) thinned to at most four per column of
/// `columns` equal columns between `x0` and `x1`: each column keeps its first, lowest,
/// highest and last point, in their order, so the outline of a dense noisy line (every spike
/// included) is drawn as it would be from all points. Returns `points` unchanged when they
/// are already that few.
pub(crate) fn decimate(points: &[(f64, f64)], x0: f64, x1: f64, columns: usize) -> Vec<(f64, f64)> {
    let columns = columns.max(1);
    if points.len() <= 4 * columns || x1 <= x0 {
        return points.to_vec();
    }
    let column = |x: f64| (((x - x0) / (x1 - x0) * columns as f64) as usize).min(columns - 1);
    let mut out = Vec::with_capacity(4 * columns);
    let mut i = 0;
    while i < points.len() {
        let c = column(points[i].0);
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < points.len() && column(points[j].0) == c {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        let mut last = usize::MAX;
        for k in keep {
            if k != last {
                out.push(points[k]);
                last = k;
            }
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_matches_tensorboard_on_a_small_series() {
        // By hand: acc = 0.5, 1.25, 2.125; debiased by 0.5, 0.75, 0.875.
        let s = ema(&[1.0, 2.0, 3.0], 0.5);
        let want = [1.0, 1.25 / 0.75, 2.125 / 0.875];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        // A constant series stays constant (the debiasing at work), and weight 0 is the series.
        assert!(ema(&[2.3; 50], 0.9)
            .iter()
            .all(|&v| (v - 2.3).abs() < 1e-12));
        assert_eq!(ema(&[3.0, 1.0, 2.0], 0.0), [3.0, 1.0, 2.0]);
        // TensorBoard's default weight on a step: 0.6 of the way behind after one value.
        let s = ema(&[0.0, 1.0], 0.6);
        assert!((s[1] - 0.4 / 0.64).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn smoothing_weight_grows_with_the_run() {
        assert_eq!(smoothing_weight(1), 0.0);
        assert_eq!(smoothing_weight(59), 0.0);
        assert_eq!(smoothing_weight(60), 0.5);
        assert_eq!(smoothing_weight(200), 0.85);
        assert_eq!(smoothing_weight(100_000), 0.999);
    }

    #[test]
    fn non_finite_values_are_left_out_and_counted() {
        let m = |step, loss| Metrics {
            step,
            loss: Some(loss),
            ..Metrics::default()
        };
        let s = Series::from_metrics(
            &[m(3, 1.0), m(1, f64::NAN), m(2, 2.0), m(4, f64::INFINITY)],
            |m| m.loss,
        );
        assert_eq!(s.points, [(2.0, 2.0), (3.0, 1.0)]);
        assert_eq!(s.skipped, [1, 4]);
        assert_eq!(s.value_range(), Some((1.0, 2.0)));
    }

    #[test]
    fn decimation_keeps_each_columns_extremes() {
        let pts: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, ((i * 7919) % 1000) as f64))
            .collect();
        let d = decimate(&pts, 0.0, 9999.0, 100);
        assert!(d.len() <= 400, "{}", d.len());
        assert_eq!(d.first(), pts.first());
        assert_eq!(d.last(), pts.last());
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "in x order");
        for c in 0..100 {
            let col = |p: &&(f64, f64)| (p.0 / 9999.0 * 100.0) as usize == c;
            let max_all = pts.iter().filter(col).map(|p| p.1).fold(0.0, f64::max);
            let max_kept = d.iter().filter(col).map(|p| p.1).fold(0.0, f64::max);
            assert_eq!(max_all, max_kept, "column {c}");
        }
        assert_eq!(decimate(&pts[..300], 0.0, 299.0, 100), &pts[..300]);
    }
}
