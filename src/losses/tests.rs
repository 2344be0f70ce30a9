//! Every loss against a float64 reference written with plain arrays (no tch), on random
//! inputs. Tolerance: relative error per position under 1e-5 (float32 arithmetic on
//! vocabularies of 50 lands near 1e-7).
use super::*;
use tch::Device;

const P: usize = 6;
const V: usize = 50;

/// Deterministic pseudo-random logits with a spread like a real model's (std ~2.5).
fn logits(seed: u64) -> Vec<Vec<f64>> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 8.0
    };
    (0..P).map(|_| (0..V).map(|_| next()).collect()).collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(a, b)| if *a > 0.0 { a * (a / b).ln() } else { 0.0 }).sum()
}

fn divergence(d: Divergence, p: &[f64], q: &[f64]) -> f64 {
    match d {
        Divergence::ForwardKl => kl(p, q),
        Divergence::ReverseKl => kl(q, p),
        Divergence::Jsd { beta } => {
            let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| beta * a + (1.0 - beta) * b).collect();
            beta * kl(p, &m) + (1.0 - beta) * kl(q, &m)
        }
    }
}

/// Teacher top-k of one position: (ids, log-probs, tail log-mass).
fn top_k(lp: &[f64], k: usize) -> (Vec<usize>, Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap());
    let ids = order[..k].to_vec();
    let rest: f64 = order[k..].iter().map(|&i| lp[i].exp()).sum();
    (ids.clone(), ids.iter().map(|&i| lp[i]).collect(), rest.ln())
}

struct Case {
    teacher: TeacherTargets,
    student: Tensor,
    refs: Vec<(Vec<usize>, Vec<f64>, f64)>,
    zs: Vec<Vec<f64>>,
}

fn case(k: usize) -> Case {
    let (zt, zs) = (logits(1), logits(2));
    let refs: Vec<_> = zt.iter().map(|z| top_k(&log_softmax(z), k)).collect();
    let ids: Vec<i64> = refs.iter().flat_map(|r| r.0.iter().map(|&i| i as i64)).collect();
    let lps: Vec<f32> = refs.iter().flat_map(|r| r.1.iter().map(|&x| x as f32)).collect();
    let tails: Vec<f32> = refs.iter().map(|r| r.2 as f32).collect();
    let flat: Vec<f32> = zs.iter().flatten().map(|&x| x as f32).collect();
    Case {
        teacher: TeacherTargets {
            ids: Tensor::from_slice(&ids).view([P as i64, k as i64]),
            logprobs: Tensor::from_slice(&lps).view([P as i64, k as i64]),
            tail_logmass: Tensor::from_slice(&tails),
        },
        student: Tensor::from_slice(&flat).view([P as i64, V as i64]).to_device(Device::Cpu),
        refs,
        zs,
    }
}

/// Reference per position: bucket or renormalised distributions, then the divergence.
fn reference(c: &Case, loss: &KdLoss) -> Vec<f64> {
    let t = loss.temperature;
    c.refs
        .iter()
        .zip(&c.zs)
        .map(|((ids, lp, tail), z)| match loss.mode {
            TopKMode::Bucket => {
                let lq = log_softmax(&z.iter().map(|x| x / t).collect::<Vec<_>>());
                // The tempered tail: flat at the smallest listed probability.
                let min = lp.iter().cloned().fold(0.0, f64::min);
                let mut logits: Vec<f64> = lp.iter().map(|x| x / t).collect();
                logits.push(tail + (1.0 / t - 1.0) * min);
                let p: Vec<f64> = log_softmax(&logits).iter().map(|x| x.exp()).collect();
                let mut q: Vec<f64> = ids.iter().map(|&i| lq[i].exp()).collect();
                q.push(1.0 - q.iter().sum::<f64>());
                divergence(loss.divergence, &p, &q) * t * t
            }
            TopKMode::Renormalized => {
                let p: Vec<f64> =
                    log_softmax(&lp.iter().map(|x| x / t).collect::<Vec<_>>()).iter().map(|x| x.exp()).collect();
                let zk: Vec<f64> = ids.iter().map(|&i| z[i] / t).collect();
                let q: Vec<f64> = log_softmax(&zk).iter().map(|x| x.exp()).collect();
                divergence(loss.divergence, &p, &q) * t * t
            }
        })
        .collect()
}

fn check(loss: KdLoss, k: usize) {
    let c = case(k);
    let ours = Vec::<f32>::try_from(loss.per_position(&c.student, &c.teacher).unwrap()).unwrap();
    for (i, (a, b)) in ours.iter().zip(reference(&c, &loss)).enumerate() {
        let rel = (*a as f64 - b).abs() / b.abs().max(1e-3);
        assert!(rel < 1e-5, "{loss:?} k={k} position {i}: {a} vs float64 {b} (rel {rel:.2e})");
    }
}

#[test]
fn bucket_divergences_match_float64() {
    for d in
        [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.5 }, Divergence::Jsd { beta: 0.1 }]
    {
        check(KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: 1.0 }, 8);
        check(KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: 2.0 }, 8);
        check(KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: 0.7 }, 8);
    }
}

/// Bucket mode at a temperature against the exact tempered divergence of the same
/// buckets (tail masses from the full tempered distributions, float64). The flat-tail
/// approximation must be exact with nothing in the tail and, with a tail, closer to the
/// exact value than treating the tail as one token (`r^(1/T)`), on every position.
#[test]
fn tempered_buckets_approximate_the_exact_tempered_divergence() {
    let (zt, zs) = (logits(1), logits(2));
    for d in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.5 }] {
        for t in [2.0, 4.0] {
            let loss = KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: t };
            for k in [8, 20, V] {
                let c = case(k);
                let ours = Vec::<f32>::try_from(loss.per_position(&c.student, &c.teacher).unwrap()).unwrap();
                for (i, (ids, lp, tail)) in c.refs.iter().enumerate() {
                    let tempered = |z: &[f64]| -> Vec<f64> {
                        log_softmax(&z.iter().map(|x| x / t).collect::<Vec<_>>()).iter().map(|x| x.exp()).collect()
                    };
                    let buckets = |p: &[f64]| {
                        let mut b: Vec<f64> = ids.iter().map(|&j| p[j]).collect();
                        b.push((0..V).filter(|j| !ids.contains(j)).map(|j| p[j]).sum());
                        b
                    };
                    let exact = divergence(d, &buckets(&tempered(&zt[i])), &buckets(&tempered(&zs[i]))) * t * t;
                    let err = (ours[i] as f64 - exact).abs();
                    if k == V {
                        assert!(err < 1e-5 * exact.max(1e-3), "{d:?} T={t}: no tail, yet {} vs {exact}", ours[i]);
                        continue;
                    }
                    // One tail token: the listed ids tempered, the tail as r^(1/T).
                    let mut one: Vec<f64> = lp.iter().map(|x| x / t).collect();
                    one.push(tail / t);
                    let one: Vec<f64> = log_softmax(&one).iter().map(|x| x.exp()).collect();
                    let naive = divergence(d, &one, &buckets(&tempered(&zs[i]))) * t * t;
                    assert!(
                        err < (naive - exact).abs(),
                        "{d:?} T={t} k={k} position {i}: flat tail off by {err:.4}, one token by {:.4}",
                        (naive - exact).abs()
                    );
                }
            }
        }
    }
}

#[test]
fn renormalized_divergences_with_temperature_match_float64() {
    for d in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.5 }] {
        for t in [1.0, 2.0] {
            check(KdLoss { divergence: d, mode: TopKMode::Renormalized, temperature: t }, 8);
        }
    }
}

#[test]
fn full_vocabulary_bucket_kl_is_the_exact_kl_with_exact_gradient() {
    let c = case(V);
    let z = c.student.set_requires_grad(true);
    let loss = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 };
    let ours = loss.per_position(&z, &c.teacher).unwrap();
    ours.sum(Kind::Float).backward();
    let grad = Vec::<Vec<f32>>::try_from(z.grad()).unwrap();
    let values = Vec::<f32>::try_from(ours).unwrap();
    for i in 0..P {
        let p: Vec<f64> = log_softmax(&logits(1)[i]).iter().map(|x| x.exp()).collect();
        let q: Vec<f64> = log_softmax(&c.zs[i]).iter().map(|x| x.exp()).collect();
        let exact = kl(&p, &q);
        assert!((values[i] as f64 - exact).abs() / exact < 1e-5, "position {i}: {} vs exact {exact}", values[i]);
        // d KL(p || softmax(z)) / dz = softmax(z) - p
        for v in 0..V {
            let want = q[v] - p[v];
            assert!((grad[i][v] as f64 - want).abs() < 1e-6, "position {i} logit {v}: grad {} vs {want}", grad[i][v]);
        }
    }
}

#[test]
fn jsd_limits_are_the_kls() {
    let c = case(8);
    let run = |d| {
        Vec::<f32>::try_from(
            KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: 1.0 }
                .per_position(&c.student, &c.teacher)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(run(Divergence::Jsd { beta: 0.0 }), run(Divergence::ForwardKl));
    assert_eq!(run(Divergence::Jsd { beta: 1.0 }), run(Divergence::ReverseKl));
}

#[test]
fn bad_settings_are_errors() {
    let c = case(8);
    let zero_t = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 0.0 };
    assert!(zero_t.per_position(&c.student, &c.teacher).is_err());
    let bad_beta = KdLoss { divergence: Divergence::Jsd { beta: 1.5 }, mode: TopKMode::Bucket, temperature: 1.0 };
    assert!(bad_beta.per_position(&c.student, &c.teacher).is_err());
}

#[test]
fn cross_entropy_and_hidden_losses_match_float64() {
    let zs = logits(3);
    let flat: Vec<f32> = zs.iter().flatten().map(|&x| x as f32).collect();
    let z = Tensor::from_slice(&flat).view([P as i64, V as i64]);
    let targets: Vec<i64> = (0..P as i64).map(|i| (i * 7) % V as i64).collect();
    let ce = Vec::<f32>::try_from(cross_entropy(&z, &Tensor::from_slice(&targets))).unwrap();
    for i in 0..P {
        let want = -log_softmax(&zs[i])[targets[i] as usize];
        assert!((ce[i] as f64 - want).abs() / want < 1e-5);
    }
    let (a, b) = (logits(4), logits(5));
    let ta = Tensor::from_slice(&a.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>()).view([P as i64, V as i64]);
    let tb = Tensor::from_slice(&b.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>()).view([P as i64, V as i64]);
    let mse = Vec::<f32>::try_from(hidden_loss(HiddenLoss::Mse, &ta, &tb)).unwrap();
    let cos = Vec::<f32>::try_from(hidden_loss(HiddenLoss::Cosine, &ta, &tb)).unwrap();
    for i in 0..P {
        let want_mse = a[i].iter().zip(&b[i]).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / V as f64;
        let dot: f64 = a[i].iter().zip(&b[i]).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let want_cos = 1.0 - dot / (norm(&a[i]) * norm(&b[i]));
        assert!((mse[i] as f64 - want_mse).abs() / want_mse < 1e-5);
        assert!((cos[i] as f64 - want_cos).abs() / want_cos.abs().max(1e-3) < 1e-5);
    }
}

/// The (k+2)-bucket targets of one position: top-k, the label (or padding when the label
/// is in the top-k), the rest; and the float64 reference partitions of p and q.
#[test]
fn label_bucket_divergences_match_float64_partitions() {
    let (zt, zs) = (logits(6), logits(7));
    for k in [8, V - 1] {
        let (mut ids, mut lps, mut rests, mut refs) = (vec![], vec![], vec![], vec![]);
        for (i, (t, z)) in zt.iter().zip(&zs).enumerate() {
            let lp = log_softmax(t);
            let (top, top_lp, _) = top_k(&lp, k);
            // Even positions: a label outside the top-k; odd: the top-1.
            let label = if i % 2 == 0 { (0..V).find(|j| !top.contains(j)).unwrap() } else { top[0] };
            let outside = !top.contains(&label);
            let lq = log_softmax(z);
            let mass = |l: &[f64], set: &[usize]| set.iter().map(|&j| l[j].exp()).sum::<f64>();
            let mut listed = top.clone();
            if outside {
                listed.push(label);
            }
            let rest_ids: Vec<usize> = (0..V).filter(|j| !listed.contains(j)).collect();
            let (mut p, mut q): (Vec<f64>, Vec<f64>) = listed.iter().map(|&j| (lp[j].exp(), lq[j].exp())).unzip();
            p.push(mass(&lp, &rest_ids));
            q.push(mass(&lq, &rest_ids));
            refs.push((p, q));
            ids.extend(top.iter().map(|&j| j as i64));
            ids.push(label as i64);
            lps.extend(top_lp.iter().map(|&x| x as f32));
            lps.push(if outside { lp[label] as f32 } else { f32::NEG_INFINITY });
            let rest = mass(&lp, &rest_ids);
            rests.push(if rest > 0.0 { rest.ln() as f32 } else { f32::NEG_INFINITY });
        }
        let m = k as i64 + 1;
        let teacher = TeacherTargets {
            ids: Tensor::from_slice(&ids).view([P as i64, m]),
            logprobs: Tensor::from_slice(&lps).view([P as i64, m]),
            tail_logmass: Tensor::from_slice(&rests),
        };
        let flat: Vec<f32> = zs.iter().flatten().map(|&x| x as f32).collect();
        let student = Tensor::from_slice(&flat).view([P as i64, V as i64]);
        for d in [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.3 }] {
            let loss = KdLoss { divergence: d, mode: TopKMode::Bucket, temperature: 1.0 };
            let ours = Vec::<f32>::try_from(loss.per_position(&student, &teacher).unwrap()).unwrap();
            for (i, (p, q)) in refs.iter().enumerate() {
                let want = divergence(d, p, q);
                let rel = (ours[i] as f64 - want).abs() / want.abs().max(1e-3);
                assert!(rel < 1e-5, "{d:?} k={k} position {i}: {} vs float64 {want} (rel {rel:.2e})", ours[i]);
            }
            if k == V - 1 {
                // Every even position lists the whole vocabulary: the full divergence.
                for (i, z) in zs.iter().enumerate().step_by(2) {
                    let (p, q) = (log_softmax(&zt[i]), log_softmax(z));
                    let (p, q): (Vec<f64>, Vec<f64>) = p.iter().zip(&q).map(|(a, b)| (a.exp(), b.exp())).unzip();
                    let want = divergence(d, &p, &q);
                    assert!((ours[i] as f64 - want).abs() / want < 1e-5, "{d:?}: full divergence at position {i}");
                }
            }
        }
    }
}
