//! AdamW whose state we own (so a checkpoint can hold it and `--resume` continue
//! exactly), with PyTorch's update order and arithmetic, and gradient clipping by
//! global norm. Norm weights and biases take no weight decay. With ZeRO-1 an optimiser
//! holds and updates only a range of the parameters laid end to end (`new_owned`). The
//! state may be kept smaller (`OptimizerMemory`, `moments.rs`): 8-bit or bf16 moments,
//! bf16 weights with float32 master copies, moments in host memory on CUDA.
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::moments::{MasterLowBits, MomentStorage, StateTensor, SLAB};
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

/// Where and how AdamW keeps its state (see `moments.rs`): moments in float32, bf16 or
/// block-wise 8-bit, and, on CUDA, in host memory instead of the GPU's. A bfloat16
/// parameter (`--weights bf16`) always gets a float32 master copy (kept as its low bits,
/// `MasterLowBits`), which the update works on; the parameter is its rounding.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OptimizerMemory {
    pub moments: MomentStorage,
    pub offload: bool,
}

struct Slot {
    name: String,
    param: Tensor,
    /// The (offset, length) of the parameter's flat elements this slot updates; `None`:
    /// all of them.
    piece: Option<(i64, i64)>,
    exp_avg: StateTensor,
    exp_avg_sq: StateTensor,
    /// The float32 master copy of a bfloat16 parameter (its low bits).
    master: Option<MasterLowBits>,
    decay: bool,
}

impl Slot {
    fn new(name: String, param: Tensor, piece: Option<(i64, i64)>, memory: OptimizerMemory) -> Self {
        let device = param.device();
        let numel = piece.map_or(param.numel() as i64, |p| p.1);
        let state_device = if memory.offload { Device::Cpu } else { device };
        let zeros = |signed| StateTensor::zeros(numel, memory.moments, signed, state_device, Some(device));
        let (exp_avg, exp_avg_sq) = (zeros(true), zeros(false));
        assert!(
            matches!(param.kind(), Kind::Float | Kind::BFloat16),
            "{name}: AdamW trains float32 or bfloat16 parameters, not {:?}",
            param.kind()
        );
        let master = (param.kind() == Kind::BFloat16).then(|| MasterLowBits::zeros(numel, state_device, Some(device)));
        Slot { decay: decays(&name), name, param, piece, exp_avg, exp_avg_sq, master }
    }

    /// The part of `t` (the parameter or its gradient) this slot updates, flat.
    fn part(&self, t: &Tensor) -> Tensor {
        match self.piece {
            None => t.reshape([-1]),
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
        Self::with_memory(named_params, cfg, OptimizerMemory::default())
    }

    /// Like `new`, with the state kept as `memory` says.
    pub fn with_memory(named_params: Vec<(String, Tensor)>, cfg: AdamWConfig, memory: OptimizerMemory) -> Self {
        let params = named_params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let slots = named_params.into_iter().map(|(name, param)| Slot::new(name, param, None, memory)).collect();
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
            slots.push(Slot::new(name, param, Some((offset, len)), OptimizerMemory::default()));
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
        let whole =
            |t: &StateTensor, s: &Slot| t.load(0, s.piece.map_or(s.param.numel() as i64, |p| p.1), s.param.device());
        [self.owned_flat(|s| whole(&s.exp_avg, s)), self.owned_flat(|s| whole(&s.exp_avg_sq, s))]
    }

    fn owned_flat(&self, part: impl Fn(&Slot) -> Tensor) -> Tensor {
        let parts: Vec<Tensor> = self.slots.iter().map(|s| part(s).reshape([-1]).to_kind(Kind::Float)).collect();
        match parts.first() {
            None => Tensor::zeros([0], (Kind::Float, self.params.first().map_or(tch::Device::Cpu, Tensor::device))),
            Some(_) => Tensor::cat(&parts, 0),
        }
    }

    /// One update with rate `lr` from the parameters' `.grad()`. Parameters without a
    /// gradient are left alone, as PyTorch does. Each parameter is updated a slab of
    /// `SLAB` elements at a time (the same arithmetic, elementwise, as a whole-tensor
    /// update; the temporaries stay a few slabs).
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let decay = 1.0 - lr * self.cfg.weight_decay;
        for s in &mut self.slots {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            debug_assert!(s.param.is_contiguous(), "{}: parameters are updated through flat views", s.name);
            let (grad, param) = (s.part(&grad), s.part(&s.param));
            let (n, device) = (param.numel() as i64, param.device());
            let mut offset = 0;
            while offset < n {
                let len = SLAB.min(n - offset);
                let g = grad.narrow(0, offset, len).to_kind(Kind::Float);
                let mut p = param.narrow(0, offset, len);
                let mut w = match &s.master {
                    Some(m) => m.load(&p, offset),
                    None => p.shallow_clone(),
                };
                let mut m = s.exp_avg.load(offset, len, device);
                let mut v = s.exp_avg_sq.load(offset, len, device);
                if s.decay && self.cfg.weight_decay != 0.0 {
                    let _ = w.g_mul_scalar_(decay);
                }
                // exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2);
                let _ = v.g_add_(&(g.square() * (1.0 - b2)));
                let denom = v.sqrt() / bias2_sqrt + self.cfg.eps;
                let update = (&m / denom) * (-lr / bias1);
                let _ = w.g_add_(&update.to_kind(w.kind()));
                if let Some(master) = &mut s.master {
                    master.store(offset, &w, &mut p);
                }
                s.exp_avg.store(offset, &m);
                s.exp_avg_sq.store(offset, &v);
                offset += len;
            }
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

    /// Bytes of optimiser state (moments, block scales, master copies): (on the
    /// parameters' devices, in host memory while the parameters are on a GPU).
    pub fn state_bytes(&self) -> (i64, i64) {
        let (mut near, mut host) = (0, 0);
        for s in &self.slots {
            let offloaded = s.param.device().is_cuda();
            let parts = [(s.exp_avg.bytes(), s.exp_avg.is_host()), (s.exp_avg_sq.bytes(), s.exp_avg_sq.is_host())];
            let master = s.master.as_ref().map(|m| (m.bytes(), m.is_host()));
            for (bytes, on_host) in parts.into_iter().chain(master) {
                if offloaded && on_host {
                    host += bytes;
                } else {
                    near += bytes;
                }
            }
        }
        (near, host)
    }

    /// The state by name (`exp_avg.NAME`, `exp_avg_sq.NAME` and, for a parameter kept
    /// in bf16, `master_low.NAME`; 8-bit moments add `exp_avg.NAME.absmax`), for a checkpoint
    /// (of an optimiser of whole parameters; a ZeRO-1 one's are gathered by
    /// `train::parallel`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for s in &self.slots {
            let shape = s.param.size();
            out.extend(s.exp_avg.saved(&format!("exp_avg.{}", s.name), &shape));
            out.extend(s.exp_avg_sq.saved(&format!("exp_avg_sq.{}", s.name), &shape));
            if let Some(m) = &s.master {
                out.push(m.saved(&format!("master_low.{}", s.name)));
            }
        }
        out
    }

    /// Restores the state saved by `state` (of whole parameters; an owned piece takes
    /// its part); every parameter must be present, stored as this optimiser keeps it.
    pub fn load_state(&mut self, steps: u64, state: &[(String, Tensor)]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            let shape = s.param.size();
            s.exp_avg.restore(&format!("exp_avg.{}", s.name), state, &shape, s.piece)?;
            s.exp_avg_sq.restore(&format!("exp_avg_sq.{}", s.name), state, &shape, s.piece)?;
            if let Some(m) = &mut s.master {
                m.restore(&format!("master_low.{}", s.name), state, s.piece)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`: the norm of the tensors' norms); returns the norm
/// before clipping. Each tensor's norm is one reduction, with no squared copy of the
/// tensor (a 262k-vocabulary embedding's gradient is as large as the matrix).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let device = grads[0].device();
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm_scalaropt_dtype(2.0, Kind::Float).to_device(device)).collect();
    let total = Tensor::stack(&norms, 0).to_kind(Kind::Double).norm().double_value(&[]);
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
