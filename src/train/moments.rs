//! How AdamW keeps its state tensors: moments in float32, bfloat16, or block-wise 8-bit
//! as bitsandbytes' AdamW8bit keeps them (blocks of 2048 values, a float32 absmax per
//! block, codes into bitsandbytes' dynamic quantisation map: signed for the first
//! moment, unsigned for the second); the float32 master copy of a bfloat16 weight as
//! the 16 low bits the weight lacks (`MasterLowBits`: exact, 2 bytes per parameter);
//! each on the parameters' device or in host memory (`--offload-optimizer` on CUDA).
//!
//! The optimiser works a slab of at most `SLAB` elements at a time: `load` gives the
//! slab as float32 on the working device (the stored tensor itself, a view updated in
//! place, when it is float32 there already), `store` writes it back (rounded or
//! quantised, copied to the host). So no step ever holds more than a few slabs of
//! float32 temporaries, whatever the largest parameter (a 262k-vocabulary embedding).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Values per quantisation block (bitsandbytes' blocks for 8-bit optimiser states).
pub const BLOCK: i64 = 2048;
/// Elements per slab of an optimiser step: a multiple of `BLOCK`.
pub const SLAB: i64 = 1 << 22;
/// Tensors smaller than this keep float32 moments (bitsandbytes' `min_8bit_size`):
/// norms and biases, where quantisation would save nothing worth its error.
pub const MIN_8BIT_SIZE: i64 = 4096;

/// The storage of AdamW's moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentStorage {
    #[default]
    Float32,
    Bf16,
    /// Block-wise 8-bit (1 byte per value + 4 per block of 2048).
    #[serde(rename = "8bit")]
    Blockwise8Bit,
}

impl MomentStorage {
    pub fn name(self) -> &'static str {
        match self {
            MomentStorage::Float32 => "float32",
            MomentStorage::Bf16 => "bf16",
            MomentStorage::Blockwise8Bit => "8bit",
        }
    }
}

/// bitsandbytes' dynamic map (`create_dynamic_map(signed, max_exponent_bits=7,
/// total_bits=8)`): 256 values in [-1, 1] (signed) or [0, 1], dense near zero, sorted.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let max_exponent_bits = 7i32;
    let non_sign_bits = 7i32;
    let mut data: Vec<f64> = vec![];
    let linspace = |n: usize| -> Vec<f64> { (0..n).map(|j| 0.1 + 0.9 * j as f64 / (n - 1) as f64).collect() };
    for i in 0..max_exponent_bits {
        let items = if signed {
            2usize.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1
        } else {
            2usize.pow((i + non_sign_bits - max_exponent_bits + 1) as u32) + 1
        };
        let bounds = linspace(items);
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    let mut out: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

/// Blocks that hold `n` values.
fn blocks_of(n: i64) -> i64 {
    (n + BLOCK - 1) / BLOCK
}

fn map_tensor(signed: bool, device: Device) -> Tensor {
    Tensor::from_slice(&maps()[usize::from(!signed)].values).to_device(device)
}

/// A dynamic map and the table that quantises to it: for each of the 65,536 values of a
/// float32's upper 16 bits (sign, exponent, 7 mantissa bits), the nearest code of the
/// bucket's lower and upper end and the midpoint between them. Every bucket spans less
/// than the gap between neighbouring codes (at most 2^-8 relative, against at least 0.7%
/// between codes), so the nearest code of any value is the lower end's or the next, picked
/// by one comparison with their midpoint: the exact nearest code (what binary search over
/// the map gives, as bitsandbytes' kernels do), with two table lookups instead of a search.
struct QuantMap {
    values: Vec<f32>,
    /// The lower end's code; the upper end's is the next one when `midpoint` is finite.
    low: Vec<u8>,
    midpoint: Vec<f32>,
}

fn maps() -> &'static [QuantMap; 2] {
    static MAPS: OnceLock<[QuantMap; 2]> = OnceLock::new();
    MAPS.get_or_init(|| [QuantMap::new(dynamic_map(true)), QuantMap::new(dynamic_map(false))])
}

impl QuantMap {
    fn new(values: Vec<f32>) -> Self {
        let nearest = |x: f32| nearest_code(&values, x);
        let (mut low, mut midpoint) = (vec![0u8; 1 << 16], vec![f32::INFINITY; 1 << 16]);
        for p in 0..1u32 << 16 {
            let (a, b) = (f32::from_bits(p << 16), f32::from_bits((p << 16) | 0xFFFF));
            if !a.is_finite() || !b.is_finite() {
                continue;
            }
            let (lo, hi) = (nearest(a.min(b).clamp(-1.0, 1.0)), nearest(a.max(b).clamp(-1.0, 1.0)));
            assert!(hi <= lo + 1, "a bucket of 16 upper bits spans two gaps of the map");
            low[p as usize] = lo as u8;
            if hi != lo {
                // The smallest float32 at or above the exact midpoint: `x >= it` holds
                // exactly for the values at or past the midpoint (a tie takes the upper
                // code, as `nearest_code` does).
                let exact = (f64::from(values[lo]) + f64::from(values[hi])) / 2.0;
                let mut m = exact as f32;
                if f64::from(m) < exact {
                    m = f32::from_bits(if m >= 0.0 { m.to_bits() + 1 } else { m.to_bits() - 1 });
                }
                midpoint[p as usize] = m;
            }
        }
        QuantMap { values, low, midpoint }
    }
}

/// The index of `values`' (sorted) nearest entry to `x`, by exact distances (a tie takes
/// the upper one).
fn nearest_code(values: &[f32], x: f32) -> usize {
    let i = values.partition_point(|&v| v < x).clamp(1, values.len() - 1);
    let (below, above) = (f64::from(x) - f64::from(values[i - 1]), f64::from(values[i]) - f64::from(x));
    if below < above {
        i - 1
    } else {
        i
    }
}

/// Codes (uint8) of `normed` (float32 in [-1, 1], contiguous) in `map`'s table.
fn nearest_codes(normed: &Tensor, map: &QuantMap) -> Tensor {
    let device = normed.device();
    let bucket = normed.view_dtype(Kind::Int).bitwise_right_shift_tensor_scalar(16).bitwise_and(0xFFFF).view([-1]);
    let low = Tensor::from_slice(&map.low).to_device(device).index_select(0, &bucket);
    let midpoint = Tensor::from_slice(&map.midpoint).to_device(device).index_select(0, &bucket);
    (low + normed.view([-1]).ge_tensor(&midpoint)).view_as(normed)
}

/// One state tensor of `numel` elements.
pub enum StateTensor {
    /// float32 or bfloat16, flat.
    Plain(Tensor),
    /// Codes `[blocks * BLOCK]` uint8 and `[blocks]` float32 absmax.
    Quantized { codes: Tensor, absmax: Tensor, signed: bool, map: Tensor },
}

impl StateTensor {
    /// Zeros in `storage` on `device` (pinned host memory when offloaded from CUDA).
    pub fn zeros(numel: i64, storage: MomentStorage, signed: bool, device: Device, pin_for: Option<Device>) -> Self {
        let pin = |t: Tensor| match pin_for {
            Some(d) if d.is_cuda() => t.pin_memory(d),
            _ => t,
        };
        match storage {
            MomentStorage::Blockwise8Bit if numel >= MIN_8BIT_SIZE => {
                let blocks = blocks_of(numel);
                // Code of 0 in the map: zeros dequantise to exactly 0.
                let map = map_tensor(signed, device);
                let zero = map.abs().argmin(0, false).int64_value(&[]);
                StateTensor::Quantized {
                    codes: pin(Tensor::full([blocks * BLOCK], zero, (Kind::Uint8, device))),
                    absmax: pin(Tensor::zeros([blocks], (Kind::Float, device))),
                    signed,
                    map,
                }
            }
            MomentStorage::Bf16 => StateTensor::Plain(pin(Tensor::zeros([numel], (Kind::BFloat16, device)))),
            _ => StateTensor::Plain(pin(Tensor::zeros([numel], (Kind::Float, device)))),
        }
    }

    fn device(&self) -> Device {
        match self {
            StateTensor::Plain(t) => t.device(),
            StateTensor::Quantized { codes, .. } => codes.device(),
        }
    }

    /// Whether `load` returns a view of the storage itself (updated in place).
    pub fn in_place(&self, device: Device) -> bool {
        matches!(self, StateTensor::Plain(t) if t.kind() == Kind::Float && t.device() == device)
    }

    /// Elements `offset..offset + len` as float32 on `device` (`offset` a multiple of
    /// `BLOCK`).
    pub fn load(&self, offset: i64, len: i64, device: Device) -> Tensor {
        match self {
            StateTensor::Plain(t) => {
                let part = t.narrow(0, offset, len);
                if self.in_place(device) {
                    part
                } else {
                    part.to_device(device).to_kind(Kind::Float)
                }
            }
            StateTensor::Quantized { codes, absmax, map, .. } => {
                let (first, blocks) = (offset / BLOCK, blocks_of(len));
                let codes = codes.narrow(0, first * BLOCK, blocks * BLOCK).to_device(device).to_kind(Kind::Int);
                let scale = absmax.narrow(0, first, blocks).to_device(device).unsqueeze(1);
                let map = map.to_device(device);
                (map.index_select(0, &codes).view([blocks, BLOCK]) * scale).view([-1]).narrow(0, 0, len)
            }
        }
    }

    /// Writes `value` (float32, from `load`) back to elements `offset..offset + len`.
    pub fn store(&mut self, offset: i64, value: &Tensor) {
        let device = self.device();
        if self.in_place(value.device()) {
            return;
        }
        let len = value.size()[0];
        match self {
            StateTensor::Plain(t) => {
                let _ = t.narrow(0, offset, len).copy_(value);
            }
            StateTensor::Quantized { codes, absmax, signed, .. } => {
                let (first, blocks) = (offset / BLOCK, blocks_of(len));
                let padded = if len == blocks * BLOCK {
                    value.shallow_clone()
                } else {
                    value.constant_pad_nd([0, blocks * BLOCK - len])
                };
                let (q, scale) = quantize(&padded.view([blocks, BLOCK]), *signed);
                let _ = codes.narrow(0, first * BLOCK, blocks * BLOCK).copy_(&q.view([-1]).to_device(device));
                let _ = absmax.narrow(0, first, blocks).copy_(&scale.to_device(device));
            }
        }
    }

    /// The tensors a checkpoint holds for this state, under `key` (e.g. `exp_avg.NAME`):
    /// the values (float32 or bfloat16, shaped as `shape`), or the codes and, under
    /// `KEY.absmax`, the block scales.
    pub fn saved(&self, key: &str, shape: &[i64]) -> Vec<(String, Tensor)> {
        match self {
            StateTensor::Plain(t) => vec![(key.to_string(), t.view(shape))],
            StateTensor::Quantized { codes, absmax, .. } => {
                vec![(key.to_string(), codes.shallow_clone()), (format!("{key}.absmax"), absmax.shallow_clone())]
            }
        }
    }

    /// Restores from `saved` (as written by `saved`, for the elements `offset..offset +
    /// len` of a tensor of `shape`, `len` the whole tensor unless a ZeRO-1 piece): the
    /// stored form must be this one's.
    pub fn restore(
        &mut self,
        key: &str,
        saved: &[(String, Tensor)],
        shape: &[i64],
        piece: Option<(i64, i64)>,
    ) -> Result<()> {
        let find = |k: &str| saved.iter().find(|(n, _)| n == k).map(|(_, t)| t);
        let Some(values) = find(key) else { bail!("optimizer state has no {key}") };
        match self {
            StateTensor::Plain(t) => {
                if values.size() != shape {
                    bail!("optimizer state {key} has shape {:?}, the parameter {shape:?}", values.size());
                }
                if values.kind() != t.kind() {
                    bail!(
                        "optimizer state {key} is {:?}, this run keeps {:?} (a checkpoint of other --optimizer-moments or --weights)",
                        values.kind(),
                        t.kind()
                    );
                }
                let flat = values.reshape([-1]);
                let part = match piece {
                    None => flat,
                    Some((offset, len)) => flat.narrow(0, offset, len),
                };
                let _ = t.copy_(&part);
            }
            StateTensor::Quantized { codes, absmax, .. } => {
                let Some(scales) = find(&format!("{key}.absmax")) else {
                    bail!("optimizer state has no {key}.absmax (a checkpoint of other --optimizer-moments)");
                };
                if values.kind() != Kind::Uint8 || values.size() != codes.size() || scales.size() != absmax.size() {
                    bail!(
                        "optimizer state {key}: codes {:?} {:?} and scales {:?}, this run keeps {:?} uint8 and {:?}",
                        values.kind(),
                        values.size(),
                        scales.size(),
                        codes.size(),
                        absmax.size()
                    );
                }
                let _ = codes.copy_(values);
                let _ = absmax.copy_(scales);
            }
        }
        Ok(())
    }

    /// Bytes this state holds (storage of its tensors).
    pub fn bytes(&self) -> i64 {
        let b = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        match self {
            StateTensor::Plain(t) => b(t),
            StateTensor::Quantized { codes, absmax, .. } => b(codes) + b(absmax),
        }
    }

    pub fn is_host(&self) -> bool {
        self.device() == Device::Cpu
    }
}

/// The float32 master copy of a bfloat16 weight, kept as only what the weight lacks: the
/// weight is the master rounded to bfloat16, and the difference of their bit patterns
/// (float32 bits minus the bfloat16 bits shifted up 16) lies in [-2^15, 2^15) because
/// rounding to nearest moves a float32 by at most half of 2^16 units of its last place
/// (a tie goes to the side that keeps it in range); stored as int16 it rebuilds the
/// master exactly. 2 bytes per parameter instead of 4.
pub struct MasterLowBits(Tensor);

impl MasterLowBits {
    /// The master of weights that are exactly bfloat16 (a start or a resumed checkpoint
    /// of rounded weights: nothing below them yet).
    pub fn zeros(numel: i64, device: Device, pin_for: Option<Device>) -> Self {
        let t = Tensor::zeros([numel], (Kind::Int16, device));
        MasterLowBits(match pin_for {
            Some(d) if d.is_cuda() && device == Device::Cpu => t.pin_memory(d),
            _ => t,
        })
    }

    /// The float32 master of `weight` (a flat bfloat16 slab at `offset`), on its device.
    pub fn load(&self, weight: &Tensor, offset: i64) -> Tensor {
        let len = weight.size()[0];
        let low = self.0.narrow(0, offset, len).to_device(weight.device()).to_kind(Kind::Int);
        (upper_bits(weight) + low).view_dtype(Kind::Float)
    }

    /// Rounds `master` (float32, contiguous) into `weight` and keeps its low bits.
    pub fn store(&mut self, offset: i64, master: &Tensor, weight: &mut Tensor) {
        let rounded = master.to_kind(Kind::BFloat16);
        let bits = master.contiguous().view_dtype(Kind::Int);
        let low = &bits - upper_bits(&rounded);
        // A tie rounded down to even leaves +2^15, one past int16: round that one up
        // instead (as near), which leaves -2^15: the weight's bits one up, its low bits
        // 2^16 down.
        let tie = low.eq(1 << 15);
        let rounded = (rounded.view_dtype(Kind::Int16) + tie.to_kind(Kind::Int16)).view_dtype(Kind::BFloat16);
        let _ = weight.copy_(&rounded);
        let low = (low - tie.to_kind(Kind::Int) * (1 << 16)).to_kind(Kind::Int16);
        let device = self.0.device();
        let _ = self.0.narrow(0, offset, low.size()[0]).copy_(&low.to_device(device));
    }

    pub fn saved(&self, key: &str) -> (String, Tensor) {
        (key.to_string(), self.0.shallow_clone())
    }

    pub fn restore(&mut self, key: &str, saved: &[(String, Tensor)], piece: Option<(i64, i64)>) -> Result<()> {
        let Some((_, t)) = saved.iter().find(|(n, _)| n == key) else {
            bail!("optimizer state has no {key} (a checkpoint of float32 weights; this run keeps --weights bf16)")
        };
        let part = match piece {
            None => t.shallow_clone(),
            Some((offset, len)) => t.narrow(0, offset, len),
        };
        if part.kind() != Kind::Int16 || part.size() != self.0.size() {
            bail!(
                "optimizer state {key} is {:?} {:?}, this run keeps int16 {:?}",
                part.kind(),
                part.size(),
                self.0.size()
            );
        }
        let _ = self.0.copy_(&part);
        Ok(())
    }

    pub fn bytes(&self) -> i64 {
        2 * self.0.numel() as i64
    }

    pub fn is_host(&self) -> bool {
        self.0.device() == Device::Cpu
    }
}

/// The bit pattern of bfloat16 `t` shifted up 16: the int32 of the float32 it is. With
/// the low bits (|low| < 2^15) added, int32 arithmetic never leaves the sign's half of
/// the range (a float32 and its rounding to bfloat16 have the same sign), so the sum is
/// the master's bit pattern exactly.
fn upper_bits(t: &Tensor) -> Tensor {
    t.contiguous().view_dtype(Kind::Int16).to_kind(Kind::Int).bitwise_left_shift_tensor_scalar(16)
}

/// Block-wise quantisation of `blocks` `[n, BLOCK]` float32: the nearest code of each
/// value divided by its block's absmax, and the absmax (1 for an all-zero block).
fn quantize(blocks: &Tensor, signed: bool) -> (Tensor, Tensor) {
    let absmax = blocks.abs().amax([1], true);
    let safe = absmax.where_self(&absmax.gt(0.0), &absmax.ones_like());
    // |x| <= absmax, so |x / absmax| <= 1 exactly (division rounds correctly).
    let normed = blocks / &safe;
    (nearest_codes(&normed, &maps()[usize::from(!signed)]), safe.squeeze_dim(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_maps_are_bitsandbytes() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        assert_eq!((signed.len(), unsigned.len()), (256, 256));
        assert!(signed.windows(2).all(|w| w[0] <= w[1]) && unsigned.windows(2).all(|w| w[0] <= w[1]));
        assert!((signed[0] + 0.99296875).abs() < 1e-7 && *signed.last().unwrap() == 1.0, "{}", signed[0]);
        assert_eq!((unsigned[0], *unsigned.last().unwrap()), (0.0, 1.0));
        // The smallest non-zero magnitudes: 1e-6 times the mean of the first interval.
        let tiny = signed.iter().copied().filter(|&x| x > 0.0).fold(f32::MAX, f32::min);
        assert!((tiny - 0.55e-6).abs() < 1e-9, "{tiny}");
    }

    #[test]
    fn the_master_rebuilds_exactly_from_the_weight_and_its_low_bits() {
        tch::manual_seed(1);
        let n = 10_000;
        let exps = Tensor::randint_low(-30, 10, [n], (Kind::Float, Device::Cpu));
        let master = Tensor::randn([n], (Kind::Float, Device::Cpu)) * exps.exp2();
        // Exact ties between two bfloat16 values (low half 0x8000), even and odd, both signs.
        let ties: Vec<f32> = [0x3F80_8000u32, 0x3F81_8000, 0xBF80_8000, 0xBF81_8000, 0x0000_8000]
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect();
        let _ = master.narrow(0, 0, ties.len() as i64).copy_(&Tensor::from_slice(&ties));
        let weight = Tensor::zeros([n], (Kind::BFloat16, Device::Cpu));
        let mut low = MasterLowBits::zeros(n, Device::Cpu, None);
        // In two slabs, the second at an offset.
        for (offset, len) in [(0, 4000), (4000, n - 4000)] {
            let mut w = weight.narrow(0, offset, len);
            low.store(offset, &master.narrow(0, offset, len), &mut w);
        }
        // The weight is the master rounded to nearest: to even, or the other way at a tie.
        let even = weight.eq_tensor(&master.to_kind(Kind::BFloat16));
        let tie = master.view_dtype(Kind::Int).bitwise_and(0xFFFF).eq(0x8000);
        assert!(even.logical_or(&tie).all().int64_value(&[]) == 1, "not rounded to nearest");
        assert!(tie.sum(Kind::Int64).int64_value(&[]) >= 5);
        let back = Tensor::cat(
            &[low.load(&weight.narrow(0, 0, 4000), 0), low.load(&weight.narrow(0, 4000, n - 4000), 4000)],
            0,
        );
        assert!(back.equal(&master), "bit-exact");
        assert_eq!(low.bytes(), 2 * n);
    }

    /// The table's code of a value is the map's nearest (binary search), over every
    /// bucket's ends and random values in [-1, 1] and near every midpoint.
    #[test]
    fn table_codes_are_the_nearest_in_the_map() {
        for signed in [true, false] {
            let map = &maps()[usize::from(!signed)];
            let v = &map.values;
            tch::manual_seed(2);
            let lower: f32 = if signed { -1.0 } else { 0.0 };
            let random =
                Tensor::rand([100_000], (Kind::Float, Device::Cpu)) * f64::from(1.0 - lower) + f64::from(lower);
            let mids: Vec<f32> = v
                .windows(2)
                .flat_map(|w| {
                    let m = (w[0] + w[1]) / 2.0;
                    [m, f32::from_bits(m.to_bits() + 1), f32::from_bits(m.to_bits().saturating_sub(1))]
                })
                .filter(|x| (lower..=1.0).contains(x))
                .collect();
            let values = Tensor::cat(&[random, Tensor::from_slice(&mids)], 0);
            let codes = Vec::<u8>::try_from(nearest_codes(&values, map)).unwrap();
            let xs = Vec::<f32>::try_from(&values).unwrap();
            let wrong = xs.iter().zip(&codes).filter(|(&x, &c)| c as usize != nearest_code(v, x)).count();
            assert_eq!(wrong, 0, "signed {signed}: {wrong} of {} values not at their nearest code", xs.len());
        }
    }

    #[test]
    fn quantised_state_round_trips_within_the_map_resolution() {
        tch::manual_seed(0);
        let n = 3 * BLOCK + 100;
        let values = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 1e-3;
        for signed in [true, false] {
            let v = if signed { values.shallow_clone() } else { values.abs() };
            let mut s = StateTensor::zeros(n, MomentStorage::Blockwise8Bit, signed, Device::Cpu, None);
            assert_eq!(s.load(0, n, Device::Cpu).abs().max().double_value(&[]), 0.0, "zeros stay zeros");
            s.store(0, &v);
            let back = s.load(0, n, Device::Cpu);
            // Relative to the block's absmax, the dynamic map's largest gap is 1/64 near 1.
            let err = (&back - &v).abs().max().double_value(&[]);
            let absmax = v.abs().max().double_value(&[]);
            assert!(err <= absmax / 64.0, "signed {signed}: {err} vs absmax {absmax}");
            // A slab in the middle reads back the same values.
            let mid = s.load(BLOCK, BLOCK + 100, Device::Cpu);
            assert!(mid.equal(&back.narrow(0, BLOCK, BLOCK + 100)));
        }
        assert_eq!(
            StateTensor::zeros(n, MomentStorage::Blockwise8Bit, true, Device::Cpu, None).bytes(),
            4 * BLOCK + 4 * 4
        );
        // Small tensors keep float32.
        assert_eq!(StateTensor::zeros(100, MomentStorage::Blockwise8Bit, true, Device::Cpu, None).bytes(), 400);
    }
}
