//! Drawing points: a tiny deterministic PRNG and the counting loop.
//!
//! SplitMix64 is not a cryptographic generator, and needs no dependency; its 64-bit outputs
//! pass BigCrush, which is plenty for estimating an area. Determinism is the point: the
//! same (seed, session, task) always counts the same, so a retried task gives the same
//! answer and a run can be reproduced.

/// SplitMix64 (Steele, Lea and Flood, 2014), as in `java.util.SplittableRandom`.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose first output is a function of `seed` alone.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for one task: its stream depends on all three ids, each mixed in through
    /// a full SplitMix64 step, so neighbouring ids give unrelated streams.
    pub fn for_task(seed: u64, session_id: u64, task_id: u64) -> Self {
        let mixed = SplitMix64::new(seed).next_u64() ^ session_id;
        let mixed = SplitMix64::new(mixed).next_u64() ^ task_id;
        SplitMix64::new(SplitMix64::new(mixed).next_u64())
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Draws `samples` points in the unit square and returns how many fall inside the quarter
/// circle of radius 1.
///
/// One 64-bit draw makes one point: its high and low halves are `x` and `y` as 32-bit
/// fixed-point fractions, so the point is inside when `x² + y² < 2⁶⁴`, which in `u64`
/// arithmetic is exactly "the sum does not overflow". The lattice of 2³² × 2³² points
/// biases the estimate by about 2⁻³², far below the sampling error of any feasible run.
pub fn count_inside(rng: &mut SplitMix64, samples: u64) -> u64 {
    let mut inside = 0;
    for _ in 0..samples {
        let r = rng.next_u64();
        let x = r >> 32;
        let y = r & 0xffff_ffff;
        let (_, overflowed) = (x * x).overflowing_add(y * y);
        inside += u64::from(!overflowed);
    }
    inside
}

/// Pi estimated from `inside` of `samples` points; NaN for no samples.
pub fn estimate(inside: u64, samples: u64) -> f64 {
    4.0 * inside as f64 / samples as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_outputs() {
        // The first outputs for seed 1234567 of the reference C implementation
        // (prng.di.unimi.it/splitmix64.c).
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(rng.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn task_streams_are_deterministic_and_distinct() {
        let first = |seed, session, task| SplitMix64::for_task(seed, session, task).next_u64();
        assert_eq!(first(0, 1, 1), first(0, 1, 1));
        let all = [
            first(0, 1, 1),
            first(1, 1, 1),
            first(0, 2, 1),
            // Swapping the session and the task gives another stream.
            first(0, 1, 2),
            first(1, 0, 1),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn counting_is_deterministic_and_near_pi() {
        let samples = 1_000_000;
        let a = count_inside(&mut SplitMix64::for_task(7, 1, 1), samples);
        let b = count_inside(&mut SplitMix64::for_task(7, 1, 1), samples);
        assert_eq!(a, b);
        assert!(a <= samples);
        // The standard error at a million samples is about 0.0016; 0.01 is six of them.
        let pi = estimate(a, samples);
        assert!((pi - std::f64::consts::PI).abs() < 0.01, "{pi}");
        assert_eq!(count_inside(&mut SplitMix64::new(0), 0), 0);
    }

    #[test]
    fn the_overflow_test_is_the_circle() {
        // On the x axis: x² = (2³² - 1)² < 2⁶⁴, inside.
        let x: u64 = 0xffff_ffff;
        assert!(!(x * x).overflowing_add(0).1);
        // On the diagonal the edge is x = y = 2³¹·√2 ≈ 3037000499.98: below it inside,
        // above it outside.
        let below: u64 = 3_037_000_499;
        let above: u64 = 3_037_000_500;
        assert!(!(below * below).overflowing_add(below * below).1);
        assert!((above * above).overflowing_add(above * above).1);
    }
}
