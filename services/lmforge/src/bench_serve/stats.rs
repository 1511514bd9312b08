//! The pure parts of the load generator: length distributions (`32`, `16..64`), Poisson
//! inter-arrival gaps, and percentiles.

use std::str::FromStr;
use std::time::Duration;

use lmforge_model::Rng;

/// A length in tokens: fixed (`32`) or uniform over an inclusive range (`16..64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthDist {
    /// Smallest length drawn.
    pub min: u32,
    /// Largest length drawn (inclusive).
    pub max: u32,
}

impl LengthDist {
    /// Always `n`.
    pub fn fixed(n: u32) -> Self {
        Self { min: n, max: n }
    }

    /// One length, uniform over `min..=max`.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let span = u64::from(self.max - self.min) + 1;
        self.min + (rng.next_u64() % span) as u32
    }

    /// Mean of the distribution.
    pub fn mean(&self) -> f64 {
        (f64::from(self.min) + f64::from(self.max)) / 2.0
    }
}

impl std::fmt::Display for LengthDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

impl FromStr for LengthDist {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |part: &str| -> Result<u32, String> {
            let n: u32 = part
                .trim()
                .parse()
                .map_err(|_| format!("`{part}` is not a whole number of tokens"))?;
            if n == 0 {
                return Err("a length must be at least 1 token".to_owned());
            }
            Ok(n)
        };
        let dist = match text.split_once("..") {
            None => Self::fixed(number(text)?),
            Some((low, high)) => Self {
                min: number(low)?,
                // `16..=64` reads the same as `16..64`: both ends are included.
                max: number(high.strip_prefix('=').unwrap_or(high))?,
            },
        };
        if dist.min > dist.max {
            return Err(format!(
                "`{text}`: the range is empty ({} > {})",
                dist.min, dist.max
            ));
        }
        Ok(dist)
    }
}

/// The gap before the next arrival of a Poisson process with `rate` arrivals per second
/// (exponentially distributed, mean `1 / rate`).
pub fn poisson_gap(rng: &mut Rng, rate: f64) -> Duration {
    debug_assert!(rate > 0.0 && rate.is_finite());
    // uniform() is in [0, 1), so 1 - u is in (0, 1] and its logarithm is finite.
    let u = 1.0 - rng.uniform();
    Duration::from_secs_f64(-u.ln() / rate)
}

/// The `p`-th percentile (0–100) of `sorted` (ascending), interpolating linearly between
/// ranks as numpy's default does; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "input is sorted");
    let last = sorted.len().checked_sub(1)?;
    let rank = (p.clamp(0.0, 100.0) / 100.0) * last as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    let weight = rank - low as f64;
    Some(sorted[low] + (sorted[high] - sorted[low]) * weight)
}

/// p50 and p99 of durations, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantiles {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

impl Quantiles {
    /// From unsorted samples in seconds.
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_fixed_and_inclusive_ranges() {
        assert_eq!("32".parse(), Ok(LengthDist::fixed(32)));
        assert_eq!("16..64".parse(), Ok(LengthDist { min: 16, max: 64 }));
        assert_eq!("16..=64".parse(), Ok(LengthDist { min: 16, max: 64 }));
        assert_eq!(" 8 .. 8".parse(), Ok(LengthDist::fixed(8)));
        assert!("0".parse::<LengthDist>().is_err());
        assert!("64..16".parse::<LengthDist>().is_err());
        assert!("abc".parse::<LengthDist>().is_err());
        assert!("16..".parse::<LengthDist>().is_err());
        assert_eq!(LengthDist { min: 16, max: 64 }.to_string(), "16..64");
        assert_eq!(LengthDist::fixed(32).to_string(), "32");
    }

    #[test]
    fn uniform_lengths_cover_both_ends_and_nothing_outside() {
        let dist: LengthDist = "3..6".parse().expect("valid");
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 8];
        for _ in 0..4000 {
            seen[dist.sample(&mut rng) as usize] += 1;
        }
        assert_eq!(&seen[..3], [0, 0, 0]);
        assert_eq!(seen[7], 0);
        for count in &seen[3..7] {
            assert!((850..1150).contains(count), "roughly uniform: {seen:?}");
        }
        assert_eq!(LengthDist::fixed(9).sample(&mut rng), 9);
    }

    #[test]
    fn poisson_gaps_have_mean_one_over_rate() {
        let mut rng = Rng::new(42);
        let rate = 20.0;
        let n = 20_000;
        let gaps: Vec<f64> = (0..n)
            .map(|_| poisson_gap(&mut rng, rate).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0 / rate).abs() < 0.03 / rate,
            "mean gap {mean}, expected {}",
            1.0 / rate
        );
        // Exponential: the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() / mean - 1.0).abs() < 0.05);
        // Seeded: the same seed gives the same arrivals.
        let again: Vec<Duration> = (0..5)
            .map(|_| poisson_gap(&mut Rng::new(7), rate))
            .collect();
        assert!(again.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 100.0), Some(10.0));
        assert_eq!(percentile(&xs, 50.0), Some(5.5));
        // numpy.percentile(range(1, 11), 99) == 9.91
        assert!((percentile(&xs, 99.0).expect("non-empty") - 9.91).abs() < 1e-12);
        let q = Quantiles::of(vec![5.0, 1.0, 3.0]);
        assert_eq!(q.p50, Some(3.0));
        assert!((q.p99.expect("non-empty") - 4.96).abs() < 1e-12);
    }
}
