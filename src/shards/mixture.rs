//! The weighted mixture of several teachers' stored distributions at one position:
//! `q = sum_t w_t p_t`, kept as the most probable ids of the union of the teachers'
//! top-k lists, the mass outside them, and the label's probability.
//!
//! A teacher stores only its top-k, so an id listed by one teacher may be missing from
//! another's list. Its probability there is unknown but bounded: every unlisted id has
//! at most the teacher's smallest listed probability, and all `V - k_t` unlisted ids
//! together hold the tail `r_t`. The rule used (`UNLISTED_RULE`) gives each unlisted id
//! `b_t = min(r_t / (V - k_t), min listed p_t)`: the tail spread evenly, capped by the
//! top-k bound. Summed over at most `V - k_t` ids it never exceeds `r_t`, so each
//! teacher's remaining tail stays >= 0 and the kept mixture probabilities plus the
//! mixed tail sum to 1. It is exact at k = V (nothing is unlisted), and two identical
//! teachers give back the one (no id is unlisted by one teacher only).
//!
//! All arithmetic is float64; the stored float16 / float32 values are rounded once, at
//! the end.
use half::f16;

/// Recorded in the manifest of a merged set.
pub const UNLISTED_RULE: &str =
    "an id missing from teacher t's top-k gets min(tail_t / (V - k_t), smallest listed p_t) \
     of teacher t; the tail is each teacher's tail plus its listed ids not kept minus those shares, mixed by weight";

/// One teacher's stored distribution at one position.
#[derive(Debug, Clone, Copy)]
pub struct TeacherPosition<'a> {
    /// Top ids, most probable first.
    pub ids: &'a [u32],
    pub logprobs: &'a [f16],
    /// log of the mass outside the top ids (-inf when they are the whole vocabulary).
    pub tail_logmass: f32,
    /// log-probability of the label (the token that follows).
    pub label_logprob: f32,
}

/// The mixture at one position, in float64.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPosition {
    /// Kept ids, most probable first (ties keep the order of first listing).
    pub ids: Vec<u32>,
    pub probs: Vec<f64>,
    /// Mixture mass outside the kept ids.
    pub tail: f64,
    pub label_logprob: f64,
}

impl TeacherPosition<'_> {
    fn prob_of(&self, id: u32) -> Option<f64> {
        self.ids.iter().position(|&i| i == id).map(|j| (self.logprobs[j].to_f64()).exp())
    }

    /// The share `b_t` given to each id this teacher does not list (see the module
    /// header); 0 when the list is the whole vocabulary.
    fn unlisted_share(&self, vocab: usize) -> f64 {
        let unlisted = vocab.saturating_sub(self.ids.len());
        if unlisted == 0 {
            return 0.0;
        }
        let tail = f64::from(self.tail_logmass).exp();
        let smallest = self.logprobs.iter().map(|l| l.to_f64().exp()).fold(f64::INFINITY, f64::min);
        (tail / unlisted as f64).min(smallest)
    }
}

/// Mixes `teachers` with `weights` (summing to 1) over a vocabulary of `vocab` ids and
/// keeps the `keep` most probable ids of the union (fewer if the union is smaller).
pub fn mix_position(teachers: &[TeacherPosition], weights: &[f64], vocab: usize, keep: usize) -> MixedPosition {
    debug_assert_eq!(teachers.len(), weights.len());
    let shares: Vec<f64> = teachers.iter().map(|t| t.unlisted_share(vocab)).collect();
    // The union in order of first listing: teacher 0's order, then new ids of the next.
    let mut union: Vec<u32> = Vec::with_capacity(teachers.iter().map(|t| t.ids.len()).sum());
    for t in teachers {
        for &id in t.ids {
            if !union.contains(&id) {
                union.push(id);
            }
        }
    }
    // Per teacher, each union id's probability (None: not listed).
    let listed: Vec<Vec<Option<f64>>> =
        teachers.iter().map(|t| union.iter().map(|&id| t.prob_of(id)).collect()).collect();
    let mut mixed: Vec<(u32, f64)> = union
        .iter()
        .enumerate()
        .map(|(u, &id)| {
            let q = (0..teachers.len()).map(|t| weights[t] * listed[t][u].unwrap_or(shares[t])).sum();
            (id, q)
        })
        .collect();
    // Stable: equal probabilities keep the order of first listing, so a mixture of
    // identical teachers lists the ids exactly as they did.
    let order = {
        let mut order: Vec<usize> = (0..mixed.len()).collect();
        order.sort_by(|&a, &b| mixed[b].1.total_cmp(&mixed[a].1));
        order.truncate(keep);
        order
    };
    let mut kept = vec![false; union.len()];
    for &u in &order {
        kept[u] = true;
    }
    let tail = (0..teachers.len())
        .map(|t| {
            let mut rest = f64::from(teachers[t].tail_logmass).exp();
            for (u, p) in listed[t].iter().enumerate() {
                match (p, kept[u]) {
                    (Some(p), false) => rest += p,
                    (None, true) => rest -= shares[t],
                    _ => {}
                }
            }
            weights[t] * rest.max(0.0)
        })
        .sum::<f64>();
    let max = teachers.iter().map(|t| f64::from(t.label_logprob)).fold(f64::NEG_INFINITY, f64::max);
    let label_logprob = match max.is_finite() {
        true => {
            max + teachers
                .iter()
                .zip(weights)
                .map(|(t, w)| w * (f64::from(t.label_logprob) - max).exp())
                .sum::<f64>()
                .ln()
        }
        false => max,
    };
    mixed = order.iter().map(|&u| mixed[u]).collect();
    MixedPosition {
        ids: mixed.iter().map(|m| m.0).collect(),
        probs: mixed.iter().map(|m| m.1).collect(),
        tail,
        label_logprob,
    }
}

impl MixedPosition {
    /// The stored forms: float16 log-probabilities, float32 log tail mass (-inf when 0)
    /// and label log-probability.
    pub fn logprobs_f16(&self) -> impl Iterator<Item = f16> + '_ {
        self.probs.iter().map(|p| f16::from_f64(p.ln().min(0.0)))
    }

    pub fn tail_logmass_f32(&self) -> f32 {
        self.tail.ln().min(0.0) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full distribution over `vocab` ids from a seeded generator, as log-probabilities.
    fn distribution(vocab: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        let logits: Vec<f64> = (0..vocab)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 8.0
            })
            .collect();
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        logits.iter().map(|l| l - lse).collect()
    }

    /// The top `k` of a distribution as stored: ids best first, float16 log-probs, the
    /// tail from the full distribution.
    fn stored(logprobs: &[f64], k: usize, label: usize) -> (Vec<u32>, Vec<f16>, f32, f32) {
        let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
        ids.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
        ids.truncate(k);
        let tail: f64 = (0..logprobs.len()).filter(|i| !ids.contains(&(*i as u32))).map(|i| logprobs[i].exp()).sum();
        let lps = ids.iter().map(|&i| f16::from_f64(logprobs[i as usize])).collect();
        (ids, lps, tail.ln() as f32, logprobs[label] as f32)
    }

    fn position(s: &(Vec<u32>, Vec<f16>, f32, f32)) -> TeacherPosition<'_> {
        TeacherPosition { ids: &s.0, logprobs: &s.1, tail_logmass: s.2, label_logprob: s.3 }
    }

    #[test]
    fn at_k_equal_to_the_vocabulary_the_mixture_is_exact() {
        let vocab = 50;
        let (a, b) = (distribution(vocab, 1), distribution(vocab, 2));
        let (sa, sb) = (stored(&a, vocab, 7), stored(&b, vocab, 7));
        let m = mix_position(&[position(&sa), position(&sb)], &[0.7, 0.3], vocab, vocab);
        assert_eq!(m.ids.len(), vocab);
        assert_eq!(m.tail, 0.0);
        assert_eq!(m.tail_logmass_f32(), f32::NEG_INFINITY);
        for (id, q) in m.ids.iter().zip(&m.probs) {
            let i = *id as usize;
            // The reference mixes the same stored (float16) log-probabilities.
            let want = 0.7 * sa.1[sa.0.iter().position(|x| x == id).unwrap()].to_f64().exp()
                + 0.3 * sb.1[sb.0.iter().position(|x| x == id).unwrap()].to_f64().exp();
            assert!((q - want).abs() <= 1e-15, "id {i}: {q} vs {want}");
        }
        assert!(m.probs.windows(2).all(|w| w[0] >= w[1]), "best first");
        let label = (0.7 * f64::from(sa.3).exp() + 0.3 * f64::from(sb.3).exp()).ln();
        assert!((m.label_logprob - label).abs() < 1e-14);
    }

    #[test]
    fn two_identical_teachers_give_back_the_one() {
        let vocab = 300;
        let s = stored(&distribution(vocab, 3), 16, 250);
        for w in [0.5, 0.7, 0.123] {
            let m = mix_position(&[position(&s), position(&s)], &[w, 1.0 - w], vocab, 16);
            assert_eq!(m.ids, s.0);
            let lps: Vec<f16> = m.logprobs_f16().collect();
            assert_eq!(lps, s.1, "weight {w}");
            assert_eq!(m.tail_logmass_f32(), s.2);
            assert_eq!(m.label_logprob as f32, s.3);
        }
    }

    #[test]
    fn an_unlisted_id_gets_a_bounded_share_and_the_mass_adds_up() {
        let vocab = 300;
        let (a, b) = (distribution(vocab, 4), distribution(vocab, 5));
        let (sa, sb) = (stored(&a, 8, 0), stored(&b, 8, 0));
        let (ta, tb) = (position(&sa), position(&sb));
        let union: Vec<u32> =
            sa.0.iter().chain(&sb.0).copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        assert!(union.len() > 8, "the seeds give different top-8 lists");
        for keep in [1, 8, union.len()] {
            let m = mix_position(&[ta, tb], &[0.6, 0.4], vocab, keep);
            assert_eq!(m.ids.len(), keep.min(union.len()));
            let total = m.probs.iter().sum::<f64>() + m.tail;
            // The stored top-k (float16) and tail (float32, from the full distribution)
            // themselves sum to 1 only up to their rounding.
            let stored_total = |s: &(Vec<u32>, Vec<f16>, f32, f32)| {
                s.1.iter().map(|l| l.to_f64().exp()).sum::<f64>() + f64::from(s.2).exp()
            };
            let want = 0.6 * stored_total(&sa) + 0.4 * stored_total(&sb);
            assert!((total - want).abs() < 1e-12, "keep {keep}: {total} vs {want}");
            assert!(m.tail >= 0.0);
            for (id, q) in m.ids.iter().zip(&m.probs) {
                let pa = ta.prob_of(*id).unwrap_or_else(|| ta.unlisted_share(vocab));
                let pb = tb.prob_of(*id).unwrap_or_else(|| tb.unlisted_share(vocab));
                assert!((q - (0.6 * pa + 0.4 * pb)).abs() < 1e-15);
            }
        }
        // The share is the even spread of the tail, capped by the smallest listed
        // probability.
        let spread = f64::from(sa.2).exp() / (vocab - 8) as f64;
        let smallest = sa.1.iter().map(|l| l.to_f64().exp()).fold(1.0, f64::min);
        assert_eq!(ta.unlisted_share(vocab), spread.min(smallest));
        // For consistent inputs the spread never exceeds the smallest listed probability
        // (the average unlisted id holds at most the largest unlisted one); the cap
        // guards stored values that disagree after rounding, as here.
        let (ids, lps) = (vec![0u32], vec![f16::from_f64(0.01f64.ln())]);
        let odd = TeacherPosition { ids: &ids, logprobs: &lps, tail_logmass: 0.99f32.ln(), label_logprob: -1.0 };
        assert_eq!(odd.unlisted_share(3), lps[0].to_f64().exp());
    }
}
