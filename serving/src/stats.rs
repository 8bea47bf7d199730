//! The statistical tests the server judges versions with, in one place: the canary judge's
//! one-sided comparisons, the A/B readout's two-sided tests with confidence intervals, and the
//! drift monitor's tests and distances (Kolmogorov–Smirnov, chi-square fit, Wasserstein,
//! Jensen–Shannon, PSI). Each
//! follows the textbook (or scipy's default, named at each function) so a reader can check a
//! readout against scipy on the same numbers; the unit tests hold scipy's answers.

use serde::Serialize;
use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, DiscreteCDF, Normal, StudentsT};

fn standard_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("the standard normal distribution")
}

/// The two-sided normal quantile of a confidence level (1.96 at 0.95).
fn normal_quantile(confidence: f64) -> f64 {
    standard_normal().inverse_cdf(0.5 + confidence / 2.0)
}

/// One comparison of a variant with the control: the estimate of the difference (variant minus
/// control), its confidence interval, and the two-sided p-value of the test that there is none.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    pub p_value: f64,
}

/// One-sided p-value that the first proportion is greater than the second (pooled z-test).
pub fn proportion_greater(hits_a: u64, n_a: u64, hits_b: u64, n_b: u64) -> f64 {
    match pooled_z(hits_a, n_a, hits_b, n_b) {
        Some(z) => 1.0 - standard_normal().cdf(z),
        None if n_a > 0 && n_b > 0 && hits_a as f64 / n_a as f64 > hits_b as f64 / n_b as f64 => {
            0.0
        }
        None => 1.0,
    }
}

/// The pooled two-proportion z statistic; `None` when it is undefined (an empty side, or no
/// spread: both proportions 0 or both 1).
fn pooled_z(hits_a: u64, n_a: u64, hits_b: u64, n_b: u64) -> Option<f64> {
    if n_a == 0 || n_b == 0 {
        return None;
    }
    let (a, b) = (n_a as f64, n_b as f64);
    let pooled = (hits_a + hits_b) as f64 / (a + b);
    let spread = (pooled * (1.0 - pooled) * (1.0 / a + 1.0 / b)).sqrt();
    (spread > 0.0).then(|| (hits_a as f64 / a - hits_b as f64 / b) / spread)
}

/// Proportion a minus proportion b: the pooled two-sided z-test (statsmodels'
/// `proportions_ztest`) and the unpooled Wald interval.
pub fn two_proportions(
    hits_a: u64,
    n_a: u64,
    hits_b: u64,
    n_b: u64,
    confidence: f64,
) -> Difference {
    let rate = |hits: u64, n: u64| if n == 0 { 0.0 } else { hits as f64 / n as f64 };
    let (pa, pb) = (rate(hits_a, n_a), rate(hits_b, n_b));
    let estimate = pa - pb;
    let p_value = match pooled_z(hits_a, n_a, hits_b, n_b) {
        Some(z) => 2.0 * (1.0 - standard_normal().cdf(z.abs())),
        None if n_a > 0 && n_b > 0 && pa != pb => 0.0,
        None => 1.0,
    };
    let se = if n_a == 0 || n_b == 0 {
        f64::INFINITY
    } else {
        (pa * (1.0 - pa) / n_a as f64 + pb * (1.0 - pb) / n_b as f64).sqrt()
    };
    let half = normal_quantile(confidence) * se;
    Difference {
        estimate,
        low: estimate - half,
        high: estimate + half,
        p_value: p_value.min(1.0),
    }
}

/// Mann–Whitney U with the normal approximation, tie and continuity corrections: the statistic
/// of `a`, its mean and standard deviation under no difference.
fn mann_whitney(a: &[f32], b: &[f32]) -> Option<(f64, f64, f64)> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let mut all: Vec<(f32, bool)> = a
        .iter()
        .map(|&v| (v, true))
        .chain(b.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let (mut rank_sum_a, mut ties) = (0.0f64, 0.0f64);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Positions i..=j share the mean of ranks i+1..=j+1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let count = (j - i + 1) as f64;
        ties += count * count * count - count;
        rank_sum_a += rank * all[i..=j].iter().filter(|(_, from_a)| *from_a).count() as f64;
        i = j + 1;
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let total = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    Some((u, n1 * n2 / 2.0, variance.max(0.0).sqrt()))
}

/// One-sided p-value that values of `a` tend to be greater than those of `b` (scipy's
/// `mannwhitneyu(a, b, alternative="greater", method="asymptotic")`).
pub fn mann_whitney_greater(a: &[f32], b: &[f32]) -> f64 {
    match mann_whitney(a, b) {
        None => 1.0,
        Some((u, mean, 0.0)) if u > mean => 0.0,
        Some((_, _, 0.0)) => 1.0,
        Some((u, mean, sd)) => 1.0 - standard_normal().cdf((u - mean - 0.5) / sd),
    }
}

/// Two-sided p-value that `a` and `b` differ in location (scipy's `mannwhitneyu(a, b,
/// method="asymptotic")`).
pub fn mann_whitney_two_sided(a: &[f32], b: &[f32]) -> f64 {
    match mann_whitney(a, b) {
        None => 1.0,
        Some((u, mean, 0.0)) if u == mean => 1.0,
        Some((_, _, 0.0)) => 0.0,
        Some((u, mean, sd)) => {
            let z = ((u - mean).abs() - 0.5) / sd;
            (2.0 * (1.0 - standard_normal().cdf(z))).min(1.0)
        }
    }
}

/// A sample's median and the variance of that median from two order statistics (Price and
/// Bonett, 2002), for intervals that need no assumption about the distribution's shape.
fn median_and_variance(values: &[f32]) -> Option<(f64, f64)> {
    if values.len() < 2 {
        return None;
    }
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    // Bonett's order statistic: c = round(n/2 - sqrt(n)), at least 1 (statpsych's ci.median).
    let c = ((n as f64 / 2.0 - (n as f64).sqrt()).round() as usize).max(1);
    // The confidence of the order-statistic interval [Y(c), Y(n-c+1)], from the binomial.
    let binomial = Binomial::new(0.5, n as u64).ok()?;
    let tail = binomial.cdf(c as u64 - 1);
    let z = standard_normal().inverse_cdf(1.0 - tail);
    let spread = sorted[n - c] - sorted[c - 1];
    let variance = if z.is_finite() && z > 0.0 {
        (spread / (2.0 * z)).powi(2)
    } else {
        0.0
    };
    Some((median, variance))
}

/// Median of `a` minus median of `b`, with the Price–Bonett interval, and the two-sided
/// Mann–Whitney p-value of a shift between them.
pub fn median_difference(a: &[f32], b: &[f32], confidence: f64) -> Option<Difference> {
    let (ma, va) = median_and_variance(a)?;
    let (mb, vb) = median_and_variance(b)?;
    let estimate = ma - mb;
    let half = normal_quantile(confidence) * (va + vb).sqrt();
    Some(Difference {
        estimate,
        low: estimate - half,
        high: estimate + half,
        p_value: mann_whitney_two_sided(a, b),
    })
}

/// Running count, mean and sum of squared deviations (Welford): exact moments of a stream in
/// fixed space.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    pub fn push(&mut self, value: f64) {
        self.n += 1;
        let delta = value - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (value - self.mean);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The sample variance (n - 1 in the denominator; 0 below two values).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            self.m2 / (self.n - 1) as f64
        }
    }
}

/// Mean of `a` minus mean of `b`: Welch's t-test and interval (scipy's `ttest_ind(a, b,
/// equal_var=False)`); `None` below two values a side.
pub fn welch(a: &Moments, b: &Moments, confidence: f64) -> Option<Difference> {
    if a.n < 2 || b.n < 2 {
        return None;
    }
    let (sa, sb) = (a.variance() / a.n as f64, b.variance() / b.n as f64);
    let estimate = a.mean - b.mean;
    let se = (sa + sb).sqrt();
    if se == 0.0 {
        let p_value = if estimate == 0.0 { 1.0 } else { 0.0 };
        return Some(Difference {
            estimate,
            low: estimate,
            high: estimate,
            p_value,
        });
    }
    let df = (sa + sb).powi(2) / (sa * sa / (a.n - 1) as f64 + sb * sb / (b.n - 1) as f64);
    let t = StudentsT::new(0.0, 1.0, df).ok()?;
    let p_value = 2.0 * (1.0 - t.cdf((estimate / se).abs()));
    let half = t.inverse_cdf(0.5 + confidence / 2.0) * se;
    Some(Difference {
        estimate,
        low: estimate - half,
        high: estimate + half,
        p_value: p_value.min(1.0),
    })
}

/// Pearson's chi-square test that two rows of counts over the same categories come from one
/// distribution (scipy's `chi2_contingency`, with its default Yates correction at one degree of
/// freedom). Categories empty in both rows are left out. Returns the statistic, the degrees of
/// freedom and the p-value; `None` when a row is empty or fewer than two categories remain.
pub fn chi_square_homogeneity(a: &[u64], b: &[u64]) -> Option<(f64, u64, f64)> {
    let columns: Vec<(f64, f64)> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| **x + **y > 0)
        .map(|(&x, &y)| (x as f64, y as f64))
        .collect();
    let (total_a, total_b) = columns
        .iter()
        .fold((0.0, 0.0), |(ta, tb), (x, y)| (ta + x, tb + y));
    if columns.len() < 2 || total_a == 0.0 || total_b == 0.0 {
        return None;
    }
    let total = total_a + total_b;
    let dof = (columns.len() - 1) as u64;
    let mut statistic = 0.0;
    for &(x, y) in &columns {
        let column = x + y;
        for (observed, row) in [(x, total_a), (y, total_b)] {
            let expected = row * column / total;
            let mut deviation = (observed - expected).abs();
            if dof == 1 {
                deviation = (deviation - 0.5).max(0.0);
            }
            statistic += deviation * deviation / expected;
        }
    }
    let p_value = 1.0 - ChiSquared::new(dof as f64).ok()?.cdf(statistic);
    Some((statistic, dof, p_value))
}

/// Sample size up to which the two-sample Kolmogorov–Smirnov p-value is exact (scipy's rule).
const EXACT_KS_SIZE: usize = 10_000;

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The two-sample Kolmogorov–Smirnov statistic and its two-sided p-value (scipy's
/// `ks_2samp(a, b)`): exact while both samples have at most 10,000 values (samples of one size
/// in linear time, as scipy; others by counting lattice paths, n1 × n2 steps); past that,
/// Kolmogorov's limiting distribution (scipy uses the finite-n one there: the p-values differ
/// slightly). NaNs are left out; `None` when a side is empty.
pub fn ks_two_sample(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    let (a, b) = (sorted(a), sorted(b));
    let (n1, n2) = (a.len(), b.len());
    if n1 == 0 || n2 == 0 {
        return None;
    }
    // The statistic as the integer h = max |i n2 - j n1| (i, j: values of a, b at or below x),
    // tied values stepping together, so the exact count below compares integers.
    let (mut i, mut j, mut h) = (0usize, 0usize, 0i64);
    while i < n1 || j < n2 {
        let x = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) | (None, Some(&x)) => x,
            (None, None) => break,
        };
        while i < n1 && a[i] <= x {
            i += 1;
        }
        while j < n2 && b[j] <= x {
            j += 1;
        }
        h = h.max((i as i64 * n2 as i64 - j as i64 * n1 as i64).abs());
    }
    let d = h as f64 / (n1 as f64 * n2 as f64);
    if h == 0 {
        return Some((d, 1.0));
    }
    let p = if n1 == n2 && n1 <= EXACT_KS_SIZE {
        ks_outside_square(n1, (h / n1 as i64) as usize)
    } else if n1.max(n2) <= EXACT_KS_SIZE {
        1.0 - ks_paths_inside(n1, n2, h)
    } else {
        let en = (n1 as f64 * n2 as f64) / (n1 + n2) as f64;
        kolmogorov_sf(en.sqrt() * d)
    };
    Some((d, p.clamp(0.0, 1.0)))
}

/// The share of monotone lattice paths from (0, 0) to (n1, n2) that keep |i n2 - j n1| < h at
/// every point: P(D < h / (n1 n2)) for two samples from one continuous distribution. Each cell
/// holds paths(i, j) / C(i + j, i), which stays within [0, 1], one row at a time.
fn ks_paths_inside(n1: usize, n2: usize, h: i64) -> f64 {
    let mut row = vec![0.0f64; n2 + 1];
    for i in 0..=n1 {
        for j in 0..=n2 {
            let inside = (i as i64 * n2 as i64 - j as i64 * n1 as i64).abs() < h;
            row[j] = if !inside {
                0.0
            } else if i == 0 && j == 0 {
                1.0
            } else {
                let total = (i + j) as f64;
                let from_below = if i > 0 {
                    row[j] * i as f64 / total
                } else {
                    0.0
                };
                let from_left = if j > 0 {
                    row[j - 1] * j as f64 / total
                } else {
                    0.0
                };
                from_below + from_left
            };
        }
    }
    row[n2]
}

/// P(D ≥ h / n) for two samples of `n` values (scipy's `_compute_prob_outside_square`: the
/// reflection sum 2 Σ (-1)^(k-1) C(2n, n - kh) / C(2n, n), evaluated from the inside out so
/// nothing cancels).
fn ks_outside_square(n: usize, h: usize) -> f64 {
    let (n, h) = (n as f64, h as f64);
    let mut p = 0.0;
    let mut k = (n / h).floor();
    while k >= 0.0 {
        let mut term = 1.0;
        let mut j = 0.0;
        while j < h {
            term = (n - k * h - j) * term / (n + k * h + j + 1.0);
            j += 1.0;
        }
        p = term * (1.0 - p);
        k -= 1.0;
    }
    2.0 * p
}

/// Kolmogorov's limiting survival function, 2 Σ (-1)^(k-1) exp(-2 k² z²).
fn kolmogorov_sf(z: f64) -> f64 {
    if z < 0.2 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let term = (-2.0 * (k * k) as f64 * z * z).exp();
        sum += if k % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// The first Wasserstein distance between two samples' empirical distributions (scipy's
/// `wasserstein_distance(a, b)`): the area between their distribution functions.
pub fn wasserstein(a: &[f64], b: &[f64]) -> Option<f64> {
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let mut all: Vec<f64> = a.iter().chain(&b).copied().collect();
    all.sort_by(f64::total_cmp);
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut area) = (0usize, 0usize, 0.0);
    for pair in all.windows(2) {
        while i < a.len() && a[i] <= pair[0] {
            i += 1;
        }
        while j < b.len() && b[j] <= pair[0] {
            j += 1;
        }
        area += (i as f64 / n1 - j as f64 / n2).abs() * (pair[1] - pair[0]);
    }
    Some(area)
}

/// Pearson's chi-square goodness of fit of observed counts to expected ones (scipy's
/// `chisquare(observed, expected)`, which wants both to add up alike): the statistic and its
/// p-value with one degree of freedom fewer than categories. A category observed but not
/// expected makes the statistic infinite and the p-value 0.
pub fn chi_square_fit(observed: &[f64], expected: &[f64]) -> Option<(f64, f64)> {
    if observed.len() < 2 || observed.len() != expected.len() {
        return None;
    }
    let mut statistic = 0.0;
    for (&o, &e) in observed.iter().zip(expected) {
        if e > 0.0 {
            statistic += (o - e) * (o - e) / e;
        } else if o > 0.0 {
            return Some((f64::INFINITY, 0.0));
        }
    }
    let dof = (observed.len() - 1) as f64;
    let p_value = 1.0 - ChiSquared::new(dof).ok()?.cdf(statistic);
    Some((statistic, p_value))
}

/// The Jensen–Shannon distance between two distributions over the same bins, natural log
/// (scipy's `spatial.distance.jensenshannon(p, q)`); each is normalised first.
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> Option<f64> {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if p.len() != q.len() || sp <= 0.0 || sq <= 0.0 {
        return None;
    }
    let kl = |x: f64, m: f64| if x > 0.0 { x * (x / m).ln() } else { 0.0 };
    let mut divergence = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let (a, b) = (a / sp, b / sq);
        let m = (a + b) / 2.0;
        divergence += (kl(a, m) + kl(b, m)) / 2.0;
    }
    Some(divergence.max(0.0).sqrt())
}

/// The population stability index of current against reference shares over the same bins:
/// Σ (c - r) ln(c / r), empty bins counted as 0.0001 (as Evidently does).
pub fn psi(reference: &[f64], current: &[f64]) -> Option<f64> {
    let (sr, sc): (f64, f64) = (reference.iter().sum(), current.iter().sum());
    if reference.len() != current.len() || sr <= 0.0 || sc <= 0.0 {
        return None;
    }
    let share = |count: f64, total: f64| (count / total).max(0.0001);
    Some(
        reference
            .iter()
            .zip(current)
            .map(|(&r, &c)| {
                let (r, c) = (share(r, sr), share(c, sc));
                (c - r) * (c / r).ln()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() < tolerance,
            "{actual} is not {expected} (within {tolerance})"
        );
    }

    fn moments(values: &[f64]) -> Moments {
        let mut m = Moments::default();
        values.iter().for_each(|&v| m.push(v));
        m
    }

    #[test]
    fn mann_whitney_matches_scipy() {
        // scipy.stats.mannwhitneyu([3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5], method="asymptotic"):
        // U = 25.5, pvalue 0.0660 two-sided; alternative="greater": 0.0330.
        let (a, b) = ([3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0, 5.0]);
        close(mann_whitney_greater(&a, &b), 0.0330, 1e-4);
        close(mann_whitney_two_sided(&a, &b), 0.066015, 1e-5);
        close(mann_whitney_two_sided(&b, &a), 0.066015, 1e-5);
        let same: Vec<f32> = (0..200).map(|i| 1.0 + (i % 10) as f32 * 0.1).collect();
        assert!(mann_whitney_greater(&same, &same) > 0.4);
        close(mann_whitney_two_sided(&same, &same), 1.0, 1e-9);
    }

    #[test]
    fn proportions_match_the_textbook() {
        // 30 of 1000 against 10 of 1000: pooled z = 3.19, one-sided p = 0.0007, two-sided 0.0014;
        // Wald 95% interval 0.02 +- 1.96 * sqrt(.03 * .97 / 1000 + .01 * .99 / 1000).
        close(proportion_greater(30, 1000, 10, 1000), 0.0007, 2e-4);
        assert!(proportion_greater(10, 1000, 30, 1000) > 0.99);
        let d = two_proportions(30, 1000, 10, 1000, 0.95);
        close(d.estimate, 0.02, 1e-12);
        close(d.p_value, 0.00142, 1e-4);
        close(d.low, 0.007760, 1e-5);
        close(d.high, 0.032240, 1e-5);
        assert_eq!(two_proportions(0, 100, 0, 100, 0.95).p_value, 1.0);
    }

    #[test]
    fn welch_matches_scipy() {
        // r = scipy.stats.ttest_ind(x, y, equal_var=False): statistic 2.4258, pvalue 0.031677,
        // df 12.1977, r.confidence_interval(0.95) = (0.053383, 0.978760).
        let x = moments(&[2.1, 2.5, 3.3, 1.9, 2.8, 3.0, 2.2, 2.9]);
        let y = moments(&[1.8, 2.0, 2.4, 1.7, 2.1, 2.6, 1.9]);
        let d = welch(&x, &y, 0.95).unwrap();
        close(d.p_value, 0.0316774, 1e-6);
        close(d.low, 0.0533827, 1e-6);
        close(d.high, 0.9787601, 1e-6);
        assert!(welch(&moments(&[1.0]), &y, 0.95).is_none());
    }

    #[test]
    fn chi_square_matches_scipy() {
        // scipy.stats.chi2_contingency([[30, 50, 20], [45, 40, 15]]): 4.8254, dof 2, p 0.089573.
        let (statistic, dof, p) = chi_square_homogeneity(&[30, 50, 20], &[45, 40, 15]).unwrap();
        close(statistic, 4.825397, 1e-6);
        assert_eq!(dof, 2);
        close(p, 0.0895733, 1e-6);
        // [[30, 70], [45, 55]] with scipy's default Yates correction: 4.1813, p 0.040872.
        let (statistic, dof, p) = chi_square_homogeneity(&[30, 70, 0], &[45, 55, 0]).unwrap();
        close(statistic, 4.181333, 1e-6);
        assert_eq!(dof, 1);
        close(p, 0.0408715, 1e-6);
        assert!(chi_square_homogeneity(&[10, 0], &[0, 0]).is_none());
    }

    #[test]
    fn the_median_standard_error_is_bonetts() {
        // statpsych's ci.median standard error, in Python: a = round(n/2 - sqrt(n)),
        // z0 = norm.ppf(1 - binom.cdf(a - 1, n, .5)), se = (y[n-a] - y[a-1]) / (2 z0).
        let y: Vec<f32> = (0..19)
            .map(|i| ((i * 37 % 19) as f32) * 1.5 + (i % 3) as f32)
            .collect();
        let (median, variance) = median_and_variance(&y).unwrap();
        close(median, 14.5, 1e-12);
        close(variance.sqrt(), 3.6302839, 1e-6);
        let y: Vec<f32> = (0..300)
            .map(|i| (i * 7919 % 1000) as f32 / 1000.0)
            .collect();
        close(median_and_variance(&y).unwrap().1.sqrt(), 0.0291723, 1e-6);
    }

    #[test]
    fn the_median_interval_covers_a_known_shift() {
        let a: Vec<f32> = (0..400).map(|i| 10.0 + (i % 20) as f32 * 0.5).collect();
        let b: Vec<f32> = (0..300).map(|i| 7.0 + (i % 20) as f32 * 0.5).collect();
        let d = median_difference(&a, &b, 0.95).unwrap();
        close(d.estimate, 3.0, 1e-9);
        assert!(d.low < 3.0 && 3.0 < d.high, "{d:?}");
        assert!(
            d.high - d.low < 2.5,
            "narrow with 700 values on a 0.5 grid: {d:?}"
        );
        assert!(d.p_value < 1e-6);
        let same = median_difference(&a, &a, 0.95).unwrap();
        assert!(
            same.low <= 0.0 && 0.0 <= same.high && same.p_value > 0.9,
            "{same:?}"
        );
    }

    fn uniform(n: usize, step: usize, modulus: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|i| (i * step % modulus) as f64 / modulus as f64 * scale)
            .collect()
    }

    #[test]
    fn kolmogorov_smirnov_matches_scipy() {
        // a = [(i * 7919 % 1000) / 1000 for i in range(300)],
        // b = [(i * 104729 % 997) / 997 * 1.3 for i in range(200)]:
        // scipy.stats.ks_2samp(a, b) = (0.216667, 2.15856e-05); (a[:40], b[:30]) = (0.2, 0.450854).
        let a = uniform(300, 7919, 1000, 1.0);
        let b = uniform(200, 104729, 997, 1.3);
        let (d, p) = ks_two_sample(&a, &b).unwrap();
        close(d, 0.2166667, 1e-6);
        close(p, 2.1585555e-5, 1e-9);
        let (d, p) = ks_two_sample(&a[..40], &b[..30]).unwrap();
        close(d, 0.2, 1e-12);
        close(p, 0.4508544, 1e-6);
        // Ties: [i % 5 for i in range(100)] against [(i % 7) * 0.8 for i in range(80)]:
        // (0.2125, 0.0311379).
        let c: Vec<f64> = (0..100).map(|i| (i % 5) as f64).collect();
        let e: Vec<f64> = (0..80).map(|i| (i % 7) as f64 * 0.8).collect();
        let (d, p) = ks_two_sample(&c, &e).unwrap();
        close(d, 0.2125, 1e-12);
        close(p, 0.0311379, 1e-6);
        assert_eq!(ks_two_sample(&a, &a).unwrap(), (0.0, 1.0));
        // 1000 against 1000: scipy's exact p-value (its reflection sum) is 0.1995737, and the
        // lattice count agrees with the sum to rounding.
        let (e, f) = (
            uniform(1000, 7919, 1000, 1.0),
            uniform(1000, 104729, 997, 1.05),
        );
        let (d, p) = ks_two_sample(&e, &f).unwrap();
        close(d, 0.048, 1e-12);
        close(p, 0.1995737, 1e-6);
        close(1.0 - ks_paths_inside(1000, 1000, 48 * 1000), p, 1e-9);
    }

    #[test]
    fn wasserstein_jensen_shannon_and_chi_square_fit_match_scipy() {
        // scipy.stats.wasserstein_distance(a, b) = 0.1316591 (a, b as above); with ties 0.42.
        let a = uniform(300, 7919, 1000, 1.0);
        let b = uniform(200, 104729, 997, 1.3);
        close(wasserstein(&a, &b).unwrap(), 0.1316591, 1e-6);
        let c: Vec<f64> = (0..100).map(|i| (i % 5) as f64).collect();
        let e: Vec<f64> = (0..80).map(|i| (i % 7) as f64 * 0.8).collect();
        close(wasserstein(&c, &e).unwrap(), 0.42, 1e-9);
        // scipy.spatial.distance.jensenshannon([.2, .5, .3], [.25, .45, .3]) = 0.0452765.
        close(
            jensen_shannon(&[0.2, 0.5, 0.3], &[25.0, 45.0, 30.0]).unwrap(),
            0.0452765,
            1e-6,
        );
        // scipy.stats.chisquare([30, 50, 20], [25, 55, 20]) = (1.454545, 0.483225).
        let (statistic, p) = chi_square_fit(&[30.0, 50.0, 20.0], &[25.0, 55.0, 20.0]).unwrap();
        close(statistic, 1.454545, 1e-6);
        close(p, 0.4832251, 1e-6);
        assert_eq!(chi_square_fit(&[3.0, 1.0], &[4.0, 0.0]).unwrap().1, 0.0);
        // Same shares: no instability; a shifted one: PSI > 0.
        close(psi(&[10.0, 20.0], &[1.0, 2.0]).unwrap(), 0.0, 1e-12);
        assert!(psi(&[50.0, 50.0], &[90.0, 10.0]).unwrap() > 0.5);
    }
}
