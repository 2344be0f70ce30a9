//! Learning-rate schedules: linear warmup, then cosine or linear decay to a floor.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    /// The rate decays to `peak_lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// The rate for optimiser step `step` (0-based): `peak * (step + 1) / warmup` during
    /// warmup, then the decay over the remaining steps.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.peak_lr * self.min_lr_ratio;
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        floor + (self.peak_lr - floor) * shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_the_floor() {
        let s =
            LrSchedule { peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, decay: Decay::Cosine, min_lr_ratio: 0.1 };
        assert!((s.lr(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr(9) - 1e-3).abs() < 1e-15);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-12, "half way: mean of peak and floor");
        assert!((s.lr(110) - 1e-4).abs() < 1e-15);
        assert!((s.lr(500) - 1e-4).abs() < 1e-15);
        let l = LrSchedule { decay: Decay::Linear, min_lr_ratio: 0.0, ..s };
        assert!((l.lr(60) - 0.5e-3).abs() < 1e-15);
    }
}
