//! The statistics every report uses: the median of a cell's runs, the percentiles of the
//! latency probes, and ratios. Values are `f64` seconds, bytes or milliseconds; NaN never
//! comes in (times and sizes), and an empty input has no median rather than a made-up one.

/// The median: the middle value, or the mean of the two middle values of an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if !n.is_multiple_of(2) => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The nearest-rank percentile `q` (0 < q <= 1): the smallest value with at least `q` of the
/// values at or below it. p100 is the maximum.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() || !(q > 0.0 && q <= 1.0) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "q * len is between 0 and len (checked above), and ceil() makes it an integer"
    )]
    let rank = (q * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// `a / b`, none when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// How much more `a` is than `b`, in percent; none when `b` is not positive.
pub fn added_percent(a: f64, b: f64) -> Option<f64> {
    ratio(a - b, b).map(|r| 100.0 * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_unsorted_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
        // One outlier does not move it.
        assert_eq!(median(&[1.0, 1.1, 100.0]), Some(1.1));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.001), Some(1.0));
        // Few samples: p99 of 20 is the maximum, p50 the 10th.
        let few: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&few, 0.99), Some(20.0));
        assert_eq!(percentile(&few, 0.5), Some(10.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&v, 0.0), None);
    }

    #[test]
    fn ratios_refuse_a_zero_base() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(added_percent(1.25, 1.0), Some(25.0));
        assert_eq!(added_percent(0.9, 1.0).map(|p| (p * 10.0).round()), Some(-100.0));
        assert_eq!(added_percent(1.0, 0.0), None);
    }
}
