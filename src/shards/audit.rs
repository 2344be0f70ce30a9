//! What a shard set's targets lose against the teacher's full distribution, kept per
//! shard in the manifest (so a resumed run keeps the audit of the shards it resumed)
//! and summed over the set for `precompute`, `import-logprobs` and `inspect`.
//!
//! From the stored targets alone, at every trained position: the probability mass of the
//! listed ids (top-k, or the kept ids of a mass-adaptive set) and whether the label lies
//! outside them. From the full distribution, which only `precompute` has (on the device),
//! at every `AUDIT_STRIDE`-th trained position of each row and at each audited
//! temperature T: the listed ids' true mass under `softmax(z / T)`, and the truncation
//! KL, `KL(p_T || p̂_T)` over the whole vocabulary, where `p̂_T` is what the stored targets
//! give a loss at T: the listed ids re-tempered as `p_i^(1/T)`, the tail bucket as the
//! losses take it (`r * p_min^(1/T - 1)`, see `losses`), spread evenly over the unlisted
//! ids, all normalised. At T = 1 the listed ids are exact and the KL is what the tail's
//! shape carries; it is 0 when k covers the vocabulary.
use serde::{Deserialize, Serialize};

use super::row::ShardRow;

/// Every this-many-th trained position of a row (target numbers 0, 32, 64, ...) is
/// audited against the full distribution. At 8, two temperatures besides 1 cost 11% of
/// precompute's time (the main job's teacher, 49k ids, 2 CPU cores: 566 -> 507
/// tokens/s); at 32 the cost is within run-to-run noise (565-591 vs 546-604 tokens/s),
/// and a million tokens still give ~30k audited positions.
pub const AUDIT_STRIDE: u64 = 32;

/// Bins of retained mass over [0, 1], for the 5th percentile.
const BINS: usize = 100;

/// Sums over the positions of one shard (or of a set, merged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditSums {
    pub positions: u64,
    pub label_outside: u64,
    pub mass_sum: f64,
    pub mass_bins: Vec<u32>,
    /// Against the full distribution, one entry per audited temperature.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tempered: Vec<TemperedSums>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemperedSums {
    pub temperature: f64,
    pub positions: u64,
    pub kl_sum: f64,
    pub mass_sum: f64,
    pub mass_bins: Vec<u32>,
}

/// The figures people read: means, 5th percentiles and shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSummary {
    pub positions: u64,
    pub retained_mass_mean: f64,
    /// To the bin width, 0.01.
    pub retained_mass_p5: f64,
    pub label_outside_share: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tempered: Vec<TemperedSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperedSummary {
    pub temperature: f64,
    pub positions: u64,
    pub truncation_kl_mean: f64,
    pub retained_mass_mean: f64,
    pub retained_mass_p5: f64,
}

fn bin(mass: f64, bins: &mut Vec<u32>) {
    bins.resize(BINS, 0);
    bins[((mass.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1)] += 1;
}

fn add_bins(into: &mut Vec<u32>, from: &[u32]) {
    into.resize(BINS, 0);
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// The lower edge of the bin holding the 5th percentile.
fn p5(bins: &[u32]) -> f64 {
    let total: u64 = bins.iter().map(|&c| c as u64).sum();
    let mut seen = 0;
    for (i, &c) in bins.iter().enumerate() {
        seen += c as u64;
        if seen * 20 > total {
            return i as f64 / BINS as f64;
        }
    }
    0.0
}

impl TemperedSums {
    pub fn new(temperature: f64) -> Self {
        TemperedSums { temperature, ..Default::default() }
    }

    /// One audited position: its truncation KL and the listed ids' mass at T. Figures
    /// that are not numbers are left out (such targets are refused where they are read,
    /// and JSON has no NaN: the manifest must stay readable).
    pub fn add(&mut self, kl: f64, mass: f64) {
        if !(kl.is_finite() && mass.is_finite()) {
            return;
        }
        self.positions += 1;
        self.kl_sum += kl;
        self.mass_sum += mass;
        bin(mass, &mut self.mass_bins);
    }
}

impl AuditSums {
    /// The stored-target figures of `rows`.
    pub fn add_rows(&mut self, rows: &[ShardRow]) {
        for row in rows {
            let labels = row.sequence.ids.iter().zip(&row.sequence.loss_mask).filter(|p| *p.1).map(|p| *p.0);
            for ((ids, logprobs), label) in row.topk.per_position().zip(labels) {
                let mass: f64 = logprobs.iter().map(|x| f64::from(x.to_f32()).exp()).sum();
                if !mass.is_finite() {
                    continue; // see `TemperedSums::add`
                }
                self.positions += 1;
                self.label_outside += !ids.contains(&label) as u64;
                self.mass_sum += mass;
                bin(mass, &mut self.mass_bins);
            }
        }
    }

    pub fn merge(&mut self, other: &AuditSums) {
        self.positions += other.positions;
        self.label_outside += other.label_outside;
        self.mass_sum += other.mass_sum;
        add_bins(&mut self.mass_bins, &other.mass_bins);
        self.merge_tempered(&other.tempered);
    }

    pub fn merge_tempered(&mut self, tempered: &[TemperedSums]) {
        for t in tempered {
            match self.tempered.iter_mut().find(|m| m.temperature == t.temperature) {
                Some(m) => {
                    m.positions += t.positions;
                    m.kl_sum += t.kl_sum;
                    m.mass_sum += t.mass_sum;
                    add_bins(&mut m.mass_bins, &t.mass_bins);
                }
                None => self.tempered.push(t.clone()),
            }
        }
        self.tempered.sort_by(|a, b| a.temperature.total_cmp(&b.temperature));
    }

    pub fn summary(&self) -> AuditSummary {
        let n = self.positions.max(1) as f64;
        AuditSummary {
            positions: self.positions,
            retained_mass_mean: self.mass_sum / n,
            retained_mass_p5: p5(&self.mass_bins),
            label_outside_share: self.label_outside as f64 / n,
            tempered: self
                .tempered
                .iter()
                .map(|t| TemperedSummary {
                    temperature: t.temperature,
                    positions: t.positions,
                    truncation_kl_mean: t.kl_sum / t.positions.max(1) as f64,
                    retained_mass_mean: t.mass_sum / t.positions.max(1) as f64,
                    retained_mass_p5: p5(&t.mass_bins),
                })
                .collect(),
        }
    }
}

impl AuditSummary {
    /// Lines for a terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "listed ids hold {:.1}% of the mass (mean; 5th percentile {:.0}%), the label lies outside them at {:.1}% of {} positions",
            100.0 * self.retained_mass_mean,
            100.0 * self.retained_mass_p5,
            100.0 * self.label_outside_share,
            self.positions
        )];
        for t in &self.tempered {
            out.push(format!(
                "T = {}: truncation KL {:.4} nats, listed mass {:.1}% (5th percentile {:.0}%), over {} audited positions",
                t.temperature,
                t.truncation_kl_mean,
                100.0 * t.retained_mass_mean,
                100.0 * t.retained_mass_p5,
                t.positions
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_shards_equals_one_pass() {
        let mut a = TemperedSums::new(2.0);
        let mut b = TemperedSums::new(2.0);
        let mut all = TemperedSums::new(2.0);
        for (i, m) in [0.9, 0.5, 0.02, 0.7].iter().enumerate() {
            if i % 2 == 0 { &mut a } else { &mut b }.add(0.1 * i as f64, *m);
            all.add(0.1 * i as f64, *m);
        }
        let mut merged = AuditSums::default();
        merged.merge_tempered(&[a]);
        merged.merge_tempered(&[b]);
        assert_eq!(merged.tempered, vec![all]);
        let s = merged.summary().tempered[0].clone();
        assert!((s.truncation_kl_mean - 0.15).abs() < 1e-12);
        assert_eq!(s.retained_mass_p5, 0.02);
        merged.tempered[0].add(f64::NAN, 0.5);
        assert_eq!(merged.tempered[0].positions, 4, "a NaN is left out, never written as JSON null");
    }
}
