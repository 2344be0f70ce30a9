//! Incremental decoding: the transformer over new tokens only, with the keys and values
//! of earlier tokens kept per layer (`KvCache`). A batch is left-padded once, at the
//! prompt; after that every row takes one token per step, so cache slot `i` is the same
//! step for every row and a row's position is the count of its real tokens before it
//! (transformers' `generate` numbers positions the same way). Attention masks are built
//! per call over all slots: causal, a row's padding hidden, sliding windows in slots.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::attention::AttentionMask;
use super::transformer::{Captures, Hidden};
use super::Transformer;

/// One layer's keys and values `[batch, kv_heads, capacity, head_dim]`, of which the
/// first `len` slots are filled. A step writes its slot in place; the buffers grow by
/// doubling, so a step copies one slot, not the whole cache (a `cat` per step copied
/// 37 MB per step at 100 slots for the main job's teacher in batches of 8).
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: i64,
}

impl LayerKv {
    /// Writes `k`, `v` `[batch, kv_heads, seq, head_dim]` after the filled slots and
    /// returns views of every filled slot.
    pub fn append(cache: &mut Option<LayerKv>, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let s = k.size()[2];
        let c = cache.get_or_insert_with(|| LayerKv::with_capacity(k, v, 0, s + 64));
        let capacity = c.k.size()[2];
        if c.len + s > capacity {
            *c = LayerKv::with_capacity(&c.k, &c.v, c.len, (2 * capacity).max(c.len + s));
        }
        c.k.narrow(2, c.len, s).copy_(k);
        c.v.narrow(2, c.len, s).copy_(v);
        c.len += s;
        c.filled()
    }

    /// New buffers of `capacity` slots holding the first `len` slots of `k`, `v`.
    fn with_capacity(k: &Tensor, v: &Tensor, len: i64, capacity: i64) -> LayerKv {
        let fresh = |t: &Tensor| {
            let mut shape = t.size();
            shape[2] = capacity;
            let buffer = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
            if len > 0 {
                buffer.narrow(2, 0, len).copy_(&t.narrow(2, 0, len));
            }
            buffer
        };
        LayerKv { k: fresh(k), v: fresh(v), len }
    }

    fn filled(&self) -> (Tensor, Tensor) {
        (self.k.narrow(2, 0, self.len), self.v.narrow(2, 0, self.len))
    }

    fn map(&mut self, f: impl Fn(&Tensor) -> Tensor) {
        (self.k, self.v) = (f(&self.k), f(&self.v));
    }
}

/// Keys and values of the tokens decoded so far, per layer, and which slots hold a real
/// token (left padding does not).
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `[batch, slots]` bool.
    real: Option<Tensor>,
    /// `[batch]` int64: the position the next real token of each row takes.
    next_positions: Option<Tensor>,
    /// Whether any slot holds padding (known on the host: no mask is needed without).
    padded: bool,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), real: None, next_positions: None, padded: false }
    }

    /// Slots filled so far.
    pub fn len(&self) -> i64 {
        self.real.as_ref().map_or(0, |r| r.size()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the rows of `other` below these, aligning the newest slots: the side with
    /// fewer slots gets empty (not real) slots on the left.
    pub fn append_rows(&mut self, other: KvCache) {
        if self.real.as_ref().is_none_or(|r| r.size()[0] == 0) {
            *self = other;
            return;
        }
        let total = self.len().max(other.len());
        let pad = |t: &Tensor, dim: i64| {
            let missing = total - t.size()[dim as usize];
            if missing == 0 {
                return t.shallow_clone();
            }
            let mut shape = t.size();
            shape[dim as usize] = missing;
            Tensor::cat(&[&Tensor::zeros(shape.as_slice(), (t.kind(), t.device())), t], dim)
        };
        let rows = |a: &Tensor, b: &Tensor, dim: i64| Tensor::cat(&[pad(a, dim), pad(b, dim)], 0);
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some(m), Some(t)) = (mine.as_mut(), theirs) {
                let ((mk, mv), (tk, tv)) = (m.filled(), t.filled());
                let (k, v) = (rows(&mk, &tk, 2), rows(&mv, &tv, 2));
                *m = LayerKv::with_capacity(&k, &v, total, total + 64);
            }
        }
        let (real, other_real) = (self.real.take().expect("checked"), other.real.expect("a filled cache"));
        self.padded |= other.padded || real.size()[1] != other_real.size()[1];
        self.real = Some(rows(&real, &other_real, 1));
        let positions = [self.next_positions.take().expect("filled"), other.next_positions.expect("filled")];
        self.next_positions = Some(Tensor::cat(&positions, 0));
    }

    /// Drops the oldest slots where no row holds a real token (the rows that needed them
    /// have left), so the batch's attention spans its live rows only.
    pub fn drop_unused_slots(&mut self) {
        let Some(real) = &self.real else { return };
        if real.size()[0] == 0 {
            return;
        }
        let used = real.any_dims(Some(&[0i64][..]), false);
        let first = used.to_kind(Kind::Int64).argmax(0, false).int64_value(&[]);
        if first == 0 {
            return;
        }
        let keep = self.len() - first;
        for layer in self.layers.iter_mut().flatten() {
            // The free slots after the filled ones stay.
            let capacity = layer.k.size()[2];
            layer.map(|t| t.narrow(2, first, capacity - first));
            layer.len = keep;
        }
        self.real = Some(real.narrow(1, first, keep));
    }

    /// Keeps only the rows `keep` (int64 indices) of every tensor, as when finished rows leave
    /// a batch.
    pub fn select_rows(&mut self, keep: &Tensor) {
        let pick = |t: &Tensor| t.index_select(0, &keep.to_device(t.device()));
        for layer in self.layers.iter_mut().flatten() {
            layer.map(pick);
        }
        self.real = self.real.as_ref().map(pick);
        self.next_positions = self.next_positions.as_ref().map(pick);
    }
}

impl Transformer {
    /// Appends `ids` `[batch, seq]` to `cache` and returns the final (normed) hidden state
    /// of the last slot of every row, `[batch, hidden]`. `mask` `[batch, seq]` (1 = token,
    /// 0 = padding) may mark left padding on the first call only.
    pub fn decode(&self, ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.decode_capturing(ids, mask, cache, &[])?.last)
    }

    /// `decode`, also returning the hidden states numbered `capture` (transformers'
    /// numbering, as `forward_hidden`) of the last slot of every row, `[batch, hidden]`.
    pub fn decode_capturing(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
        capture: &[usize],
    ) -> Result<Hidden> {
        let _guard = tch::no_grad_guard();
        let n = self.check_capture(capture)?;
        if self.layer_devices.iter().any(|&d| d != self.layer_devices[0]) {
            bail!("decoding with a model split over several devices is not supported; load it on one device");
        }
        let (b, s) = ids.size2()?;
        let device = ids.device();
        let mask = mask.to_device(device).ne(0);
        cache.padded |= mask.logical_not().any().int64_value(&[]) != 0;
        let before = match &cache.next_positions {
            Some(p) => p.shallow_clone(),
            None => Tensor::zeros([b], (Kind::Int64, device)),
        };
        let counted = mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
        let positions = (before.unsqueeze(1) + &counted - 1).clamp_min(0);
        cache.next_positions = Some(before + counted.select(1, s - 1));
        let real = match cache.real.take() {
            Some(r) => Tensor::cat(&[r, mask.shallow_clone()], 1),
            None => mask.shallow_clone(),
        };
        let past = real.size()[1] - s;
        let masks = SlotMasks::new(&real, past, s, cache.padded, device);
        // One mask per distinct window per call, not one per layer.
        let mut windows: Vec<Option<usize>> = self.layers.iter().map(|l| l.sliding_window).collect();
        windows.sort_unstable();
        windows.dedup();
        let per_window: Vec<(Option<usize>, AttentionMask)> =
            windows.into_iter().map(|w| (w, masks.for_window(w))).collect();
        cache.real = Some(real);
        let mut x = self.embed(ids);
        let tables = self.rotary_tables(&positions, x.kind());
        let mut captured = Captures::new(capture);
        captured.keep(0, || x.select(1, s - 1));
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let mask = &per_window.iter().find(|(w, _)| *w == layer.sliding_window).expect("built above").1;
            let (cos, sin) = &tables[layer.rope];
            x = layer.forward_cached(&x, cos, sin, mask, slot);
            if i + 1 < n {
                captured.keep(i + 1, || x.select(1, s - 1));
            }
        }
        let last = self.final_norm(&x.select(1, s - 1));
        captured.keep(n, || last.shallow_clone());
        Ok(Hidden { captured: captured.into_states(), last })
    }
}

/// `[batch, 1, seq, slots]` masks of one decoding call: the new tokens (slots
/// `past..past + seq`) see earlier and equal slots that hold real tokens, within the
/// layer's window. A padding query also sees itself, so no row of the softmax is empty.
/// Without padding and with no window cutting in, no mask: plain causal attention for
/// the prompt, every slot for a one-token step.
struct SlotMasks {
    base: Tensor,
    query_slots: Tensor,
    key_slots: Tensor,
    padded: bool,
    past: i64,
    total: i64,
}

impl SlotMasks {
    fn new(real: &Tensor, past: i64, s: i64, padded: bool, device: Device) -> Self {
        let total = past + s;
        let query_slots = Tensor::arange_start(past, total, (Kind::Int64, device)).view([1, 1, s, 1]);
        let key_slots = Tensor::arange(total, (Kind::Int64, device)).view([1, 1, 1, total]);
        let causal = key_slots.le_tensor(&query_slots);
        let base = causal.logical_and(&real.unsqueeze(1).unsqueeze(1));
        SlotMasks { base, query_slots, key_slots, padded, past, total }
    }

    fn for_window(&self, window: Option<usize>) -> AttentionMask {
        let window_cuts = window.is_some_and(|w| self.total > w as i64);
        if !self.padded && !window_cuts {
            if self.past == 0 {
                return AttentionMask::Causal;
            }
            if self.total - self.past == 1 {
                return AttentionMask::All;
            }
        }
        let allowed = match window {
            None => self.base.shallow_clone(),
            Some(w) => self.base.logical_and(&(&self.query_slots - &self.key_slots).lt(w as i64)),
        };
        AttentionMask::Explicit(allowed.logical_or(&self.key_slots.eq_tensor(&self.query_slots)))
    }
}
