//! Learning-rate schedule: linear warmup, then cosine decay to a floor.

/// `lr(step)` for `step` in `0..total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    /// The final learning rate as a fraction of the peak.
    pub floor_ratio: f64,
}

impl Schedule {
    /// Warmup rises linearly from `peak / warmup` to `peak`; afterwards the rate follows
    /// half a cosine from `peak` down to `floor_ratio * peak` at the last step.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = (self.total.saturating_sub(self.warmup)).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / decay_steps).min(1.0);
        let floor = self.floor_ratio * self.peak;
        floor + 0.5 * (self.peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = Schedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            floor_ratio: 0.1,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-9, "{}", s.lr(60));
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((10..110).all(|i| s.lr(i + 1) <= s.lr(i)));
    }
}
