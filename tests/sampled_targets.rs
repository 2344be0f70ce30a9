//! Tail draws give an unbiased estimate of the full-vocabulary forward-KL gradient: the
//! same code that draws at precompute (`precompute::capture`), builds the targets for
//! training (`batch::targets`) and computes the loss (`losses`), checked statistically.
//!
//! For one teacher distribution p and student logits z (q = softmax z), R independent
//! positions each draw M ids. The gradient of one position's loss with respect to z is
//! `q - p_hat`, where p_hat is exact on the top-k (up to float16 storage) and
//! `tail * c_j / M` on a tail id j drawn c_j times. Then E[g_j] = q_j - p_j (the full
//! KL's gradient), and as c_j ~ Binomial(M, p_j / tail), the variance of one position's
//! g_j is `tail^2 pi_j (1 - pi_j) / M` with pi_j = p_j / tail. The mean over R positions
//! has standard error `se_j = sqrt(var_j / R)`; by the central limit theorem (R M pi_j is
//! large for every id that matters here) the test allows 5 se_j per id: for V = 40 ids
//! the chance that any of them fails by chance is below 40 * 5.7e-7 = 2.3e-5. The
//! top-k ids add the float16 rounding of their stored log-probability,
//! `p_j * |log p_j| * 2^-11`. The same test refuses the top-k bucket targets without
//! draws: their gradient on tail ids is biased by hundreds of standard errors.
use distill::batch::targets::{teacher_targets, TargetOptions};
use distill::dataset::sequence::Sequence;
use distill::losses::{Divergence, KdLoss, TopKMode};
use distill::model::sampling::{draw_from_logits, draw_uniforms};
use distill::precompute::capture::tail_draws;
use distill::shards::row::{ShardRow, TopKTargets};
use half::f16;
use tch::{Kind, Tensor};

const V: i64 = 40;
const R: usize = 4000;

/// A teacher with a few likely ids and a long tail, and an unrelated student; from a
/// seed alone (libtorch's generator is shared with the tests running beside these).
fn logits() -> (Tensor, Tensor) {
    let normal = |row: u64| -> Vec<f64> {
        let u = draw_uniforms(3, row, 0, 2 * V as usize);
        u.chunks(2).map(|ab| (-2.0 * (1.0 - ab[0]).ln()).sqrt() * (std::f64::consts::TAU * ab[1]).cos()).collect()
    };
    let teacher: Vec<f64> =
        normal(0).iter().enumerate().map(|(i, x)| 1.5 * x + if i < 3 { 4.0 } else { 0.0 }).collect();
    (Tensor::from_slice(&teacher), Tensor::from_slice(&normal(1)))
}

/// One shard row of R + 1 tokens whose R trained positions all hold the teacher's top-k
/// of `teacher` and, with `draws`, M draws from its tail, as `precompute` stores them.
fn row(teacher: &Tensor, k: i64, draws: Option<usize>) -> ShardRow {
    let lp = teacher.log_softmax(-1, Kind::Double);
    let (top, ids) = lp.topk(k, -1, true, true);
    let masked = lp.scatter_value(-1, &ids, f64::NEG_INFINITY);
    let tail = masked.logsumexp([-1], false).double_value(&[]) as f32;
    let ids: Vec<i64> = Vec::try_from(&ids).unwrap();
    let top: Vec<f64> = Vec::try_from(&top).unwrap();
    let drawn = draws.map(|m| {
        let u: Vec<f64> = (0..R as u64).flat_map(|t| draw_uniforms(7, 0, t, m)).collect();
        let u = Tensor::from_slice(&u).view([R as i64, m as i64]);
        let logits = masked.to_kind(Kind::Float).unsqueeze(0).expand([R as i64, V], false).contiguous();
        tail_draws(&Vec::<i64>::try_from(draw_from_logits(&logits, &u).reshape([-1])).unwrap(), m)
    });
    let sequence = Sequence {
        row_index: 0,
        sample_ids: vec!["x".into()],
        doc_lengths: vec![R as u32 + 1],
        ids: vec![0; R + 1],
        loss_mask: (0..=R).map(|t| t > 0).collect(),
        sampler_logprobs: None,
    };
    let topk = TopKTargets {
        k: k as usize,
        lengths: None,
        ids: (0..R).flat_map(|_| ids.iter().map(|&i| i as u32)).collect(),
        logprobs: (0..R).flat_map(|_| top.iter().map(|&x| f16::from_f64(x))).collect(),
        tail_logmass: vec![tail; R],
        target_logprob: vec![-1.0; R],
        draws: drawn,
        uld: None,
    };
    ShardRow { sequence, topk, hidden: vec![] }
}

/// Mean over the R positions of d loss / d z, and the expected value q - p.
fn mean_gradient(teacher: &Tensor, student: &Tensor, row: &ShardRow) -> (Vec<f64>, Vec<f64>) {
    let targets = teacher_targets(std::slice::from_ref(row), TargetOptions { label_bucket: false, use_draws: true });
    let z = student.unsqueeze(0).expand([R as i64, V], false).contiguous().set_requires_grad(true);
    let loss = KdLoss { divergence: Divergence::ForwardKl, mode: TopKMode::Bucket, temperature: 1.0 };
    loss.per_position(&z, &targets).unwrap().sum(Kind::Double).backward();
    let mean: Vec<f64> = Vec::try_from(z.grad().mean_dim(0, false, Kind::Double)).unwrap();
    let expected = student.softmax(-1, Kind::Double) - teacher.softmax(-1, Kind::Double);
    (mean, Vec::try_from(expected).unwrap())
}

/// Largest |mean - expected| / allowed over the ids, with the allowance derived above.
fn worst_ratio(teacher: &Tensor, k: i64, m: usize, mean: &[f64], expected: &[f64]) -> f64 {
    let lp: Vec<f64> = Vec::try_from(teacher.log_softmax(-1, Kind::Double)).unwrap();
    let mut order: Vec<usize> = (0..V as usize).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
    let top = &order[..k as usize];
    let tail: f64 = order[k as usize..].iter().map(|&j| lp[j].exp()).sum();
    (0..V as usize)
        .map(|j| {
            let p = lp[j].exp();
            let allowed = if top.contains(&j) {
                p * lp[j].abs() * 2f64.powi(-11) + 1e-6
            } else {
                let pi = p / tail;
                5.0 * (tail * tail * pi * (1.0 - pi) / m as f64 / R as f64).sqrt() + 1e-6
            };
            (mean[j] - expected[j]).abs() / allowed
        })
        .fold(0.0, f64::max)
}

#[test]
fn draws_alone_estimate_the_full_kl_gradient_without_bias() {
    let (teacher, student) = logits();
    for m in [4, 12] {
        let (mean, expected) = mean_gradient(&teacher, &student, &row(&teacher, 0, Some(m)));
        let worst = worst_ratio(&teacher, 0, m, &mean, &expected);
        eprintln!("worst id at {worst:.3} of its allowance");
        assert!(worst <= 1.0, "M = {m}: an id's mean gradient is off by {worst:.2} of its allowance");
    }
}

#[test]
fn top_k_with_tail_draws_estimates_the_full_kl_gradient_without_bias() {
    let (teacher, student) = logits();
    for (k, m) in [(3, 4), (8, 12)] {
        let (mean, expected) = mean_gradient(&teacher, &student, &row(&teacher, k, Some(m)));
        let worst = worst_ratio(&teacher, k, m, &mean, &expected);
        eprintln!("worst id at {worst:.3} of its allowance");
        assert!(worst <= 1.0, "k = {k}, M = {m}: an id's mean gradient is off by {worst:.2} of its allowance");
    }
}

#[test]
fn the_top_k_bucket_alone_is_biased_and_the_test_sees_it() {
    let (teacher, student) = logits();
    let (mean, expected) = mean_gradient(&teacher, &student, &row(&teacher, 3, None));
    let worst = worst_ratio(&teacher, 3, 12, &mean, &expected);
    assert!(worst > 50.0, "the top-3 bucket's tail gradient should be far off the full one, not {worst:.2}");
}
