//! AdamW whose state we own (so a checkpoint can hold it and `--resume` continue
//! exactly), with PyTorch's update order and arithmetic, and gradient clipping by
//! global norm. Norm weights and biases take no weight decay. With ZeRO-1 an optimiser
//! holds and updates only a range of the parameters laid end to end (`new_owned`).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::distributed::zero::Partition;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

struct Slot {
    name: String,
    param: Tensor,
    /// The (offset, length) of the parameter's flat elements this slot updates; `None`:
    /// all of them.
    piece: Option<(i64, i64)>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

impl Slot {
    /// The part of `t` (the parameter or its gradient) this slot updates.
    fn part(&self, t: &Tensor) -> Tensor {
        match self.piece {
            None => t.shallow_clone(),
            Some((offset, len)) => t.view([-1]).narrow(0, offset, len),
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Every parameter given, owned or not: `zero_grad` clears all their gradients.
    params: Vec<Tensor>,
    /// Optimiser steps taken (PyTorch's `step`, for bias correction).
    pub steps: u64,
}

/// Whether a parameter takes weight decay: not norms, not biases (the usual practice).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    /// Moments start at zero, in float32 (master precision), on each parameter's device.
    pub fn new(named_params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let params = named_params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let slots = named_params
            .into_iter()
            .map(|(name, param)| {
                let zeros = || Tensor::zeros_like(&param).to_kind(Kind::Float);
                Slot { decay: decays(&name), exp_avg: zeros(), exp_avg_sq: zeros(), name, param, piece: None }
            })
            .collect();
        AdamW { cfg, slots, params, steps: 0 }
    }

    /// An optimiser of rank `rank`'s range of `partition` (the parameters laid end to
    /// end in the given order, flattened): moments for those elements only. Parameters
    /// must be contiguous.
    pub fn new_owned(
        named_params: Vec<(String, Tensor)>,
        cfg: AdamWConfig,
        partition: &Partition,
        rank: usize,
    ) -> Self {
        let params = named_params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let mut named: Vec<Option<(String, Tensor)>> = named_params.into_iter().map(Some).collect();
        let mut slots = vec![];
        for (i, offset, _, len) in partition.pieces(partition.owned(rank)) {
            let (name, param) = named[i].take().expect("a parameter has one piece per range");
            let zeros = || Tensor::zeros([len], (Kind::Float, param.device()));
            let piece = Some((offset, len));
            slots.push(Slot { decay: decays(&name), exp_avg: zeros(), exp_avg_sq: zeros(), name, param, piece });
        }
        AdamW { cfg, slots, params, steps: 0 }
    }

    /// The owned elements' current values, laid end to end in the order of `new_owned`
    /// (what a rank contributes to the gather of the weights).
    pub fn owned_values(&self) -> Tensor {
        self.owned_flat(|s| s.part(&s.param))
    }

    /// The owned elements' moments (exp_avg, exp_avg_sq), laid end to end likewise.
    pub fn owned_moments(&self) -> [Tensor; 2] {
        [self.owned_flat(|s| s.exp_avg.shallow_clone()), self.owned_flat(|s| s.exp_avg_sq.shallow_clone())]
    }

    fn owned_flat(&self, part: impl Fn(&Slot) -> Tensor) -> Tensor {
        let parts: Vec<Tensor> = self.slots.iter().map(|s| part(s).reshape([-1]).to_kind(Kind::Float)).collect();
        match parts.first() {
            None => Tensor::zeros([0], (Kind::Float, self.params.first().map_or(tch::Device::Cpu, Tensor::device))),
            Some(_) => Tensor::cat(&parts, 0),
        }
    }

    /// One update with rate `lr` from the parameters' `.grad()`. Parameters without a
    /// gradient are left alone, as PyTorch does.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for s in &mut self.slots {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            let g = s.part(&grad).to_kind(Kind::Float);
            let mut param = s.part(&s.param);
            if s.decay && self.cfg.weight_decay != 0.0 {
                let _ = param.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
            }
            // exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
            let _ = s.exp_avg.lerp_(&g, 1.0 - b1);
            let _ = s.exp_avg_sq.g_mul_scalar_(b2);
            let _ = s.exp_avg_sq.g_add_(&(g.square() * (1.0 - b2)));
            let denom = s.exp_avg_sq.sqrt() / bias2_sqrt + self.cfg.eps;
            let update = (&s.exp_avg / denom) * (-lr / bias1);
            let _ = param.g_add_(&update.to_kind(param.kind()));
        }
    }

    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The moments by name (`exp_avg.NAME`, `exp_avg_sq.NAME`), for a checkpoint (of an
    /// optimiser of whole parameters; a ZeRO-1 one's are gathered by `train::parallel`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()),
                    (format!("exp_avg_sq.{}", s.name), s.exp_avg_sq.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by `state` (of whole parameters; an owned piece takes its
    /// part); every parameter must be present.
    pub fn load_state(&mut self, steps: u64, state: &[(String, Tensor)]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            let shape = s.param.size();
            let piece = s.piece;
            for (prefix, slot) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                let key = format!("{prefix}.{}", s.name);
                let Some((_, saved)) = state.iter().find(|(n, _)| *n == key) else {
                    bail!("optimizer state has no {key}");
                };
                if saved.size() != shape {
                    bail!("optimizer state {key} has shape {:?}, the parameter {shape:?}", saved.size());
                }
                match piece {
                    None => slot.copy_(saved),
                    Some((offset, len)) => slot.copy_(&saved.reshape([-1]).narrow(0, offset, len)),
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let total = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
        .fold(Tensor::from(0f32), |acc, x| acc + x.to_device(tch::Device::Cpu))
        .sqrt()
        .double_value(&[]);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for mut g in grads {
            let _ = g.g_mul_scalar_(coef);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's AdamW, written out in float64 for one scalar parameter.
    fn reference(p0: f64, grads: &[f64], lrs: &[f64], cfg: &AdamWConfig, decay: bool) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, (&g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            if decay {
                p *= 1.0 - lr * cfg.weight_decay;
            }
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            let denom = v.sqrt() / (1.0 - cfg.beta2.powi(t)).sqrt() + cfg.eps;
            p -= lr / (1.0 - cfg.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn adamw_matches_pytorch_algorithm_in_float64() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let init = [0.5f64, -1.25, 2.0, 0.03];
        let grads_per_step: Vec<[f64; 4]> =
            (0..6).map(|s| [0.1 * s as f64 - 0.2, 1.5, -0.7 + 0.05 * s as f64, 1e-4]).collect();
        let lrs: Vec<f64> = (0..6).map(|s| 1e-2 / (1.0 + s as f64)).collect();
        for (name, decay) in [("model.layers.0.mlp.up_proj.weight", true), ("model.norm.weight", false)] {
            let w = Tensor::from_slice(&init.map(|x| x as f32)).set_requires_grad(true);
            let mut opt = AdamW::new(vec![(name.to_string(), w.shallow_clone())], cfg);
            for (g, &lr) in grads_per_step.iter().zip(&lrs) {
                opt.zero_grad();
                let gt = Tensor::from_slice(&g.map(|x| x as f32));
                (&w * &gt).sum(Kind::Float).backward(); // d/dw = g
                opt.step(lr);
            }
            let got = Vec::<f32>::try_from(w.detach()).unwrap();
            for i in 0..4 {
                let grads: Vec<f64> = grads_per_step.iter().map(|g| g[i]).collect();
                let want = reference(init[i], &grads, &lrs, &cfg, decay);
                let rel = (got[i] as f64 - want).abs() / want.abs();
                assert!(rel < 1e-5, "{name}[{i}]: {} vs float64 {want}", got[i]);
            }
        }
    }

    #[test]
    fn state_round_trips_and_clipping_bounds_the_norm() {
        let w = Tensor::from_slice(&[1f32, 2., 3.]).set_requires_grad(true);
        let mut a = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default());
        (&w * &w).sum(Kind::Float).backward(); // grad = 2w = [2, 4, 6], norm sqrt(56)
        let norm = clip_grad_norm(&[w.shallow_clone()], 1.0);
        assert!((norm - 56f64.sqrt()).abs() < 1e-5);
        let clipped = w.grad().square().sum(Kind::Float).sqrt().double_value(&[]);
        assert!((clipped - 1.0).abs() < 1e-5);
        a.step(0.1);
        let mut b = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default());
        b.load_state(a.steps, &a.state()).unwrap();
        assert_eq!(b.steps, 1);
        assert_eq!(Vec::<f32>::try_from(&b.state()[1].1).unwrap(), Vec::<f32>::try_from(&a.state()[1].1).unwrap());
        let mut c = AdamW::new(vec![("other".into(), w.shallow_clone())], AdamWConfig::default());
        assert!(c.load_state(1, &a.state()).unwrap_err().to_string().contains("exp_avg.other"));
    }

    /// Two optimisers that own the two halves of the parameters laid end to end update
    /// them exactly as one optimiser of all of them (ZeRO-1's arithmetic).
    #[test]
    fn owned_ranges_update_like_the_whole() {
        let init = |seed: i64| {
            tch::manual_seed(seed);
            vec![
                (
                    "a.weight".to_string(),
                    Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
                ),
                (
                    "b.norm.weight".to_string(),
                    Tensor::randn([5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
                ),
            ]
        };
        let (whole_params, split_params) = (init(1), init(1));
        let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let shallow =
            |v: &[(String, Tensor)]| v.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        let mut whole = AdamW::new(shallow(&whole_params), cfg);
        // Ranges 0..9 and 9..17: `a.weight` (12 elements) is split between them.
        let partition = Partition::new(&[12, 5], 2);
        let mut halves = [0, 1].map(|rank| AdamW::new_owned(shallow(&split_params), cfg, &partition, rank));
        for step in 0..3 {
            // Each rank clears every gradient, owned or not (not only its range's).
            whole.zero_grad();
            halves[0].zero_grad();
            for params in [&whole_params, &split_params] {
                let loss: Tensor = params.iter().map(|(_, p)| (p * p * (step as f64 + 1.0)).sum(Kind::Float)).sum();
                loss.backward();
            }
            whole.step(1e-2);
            for h in &mut halves {
                h.step(1e-2);
            }
        }
        for ((_, a), (_, b)) in whole_params.iter().zip(&split_params) {
            assert_eq!(
                Vec::<f32>::try_from(a.detach().reshape([-1])).unwrap(),
                Vec::<f32>::try_from(b.detach().reshape([-1])).unwrap()
            );
        }
        let [m0, _] = halves[0].owned_moments();
        let [m1, _] = halves[1].owned_moments();
        let full: Vec<Tensor> = whole
            .state()
            .into_iter()
            .filter(|(n, _)| n.starts_with("exp_avg."))
            .map(|(_, t)| t.reshape([-1]))
            .collect();
        let joined = Tensor::cat(&[m0, m1], 0);
        assert_eq!(Vec::<f32>::try_from(Tensor::cat(&full, 0)).unwrap(), Vec::<f32>::try_from(joined).unwrap());
    }
}
