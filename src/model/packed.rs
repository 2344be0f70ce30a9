//! Attention over packed rows, one document at a time: a packed row's attention costs
//! the sum of its documents' squares, never the row's square, and no `[seq, seq]` mask
//! is ever built for it.
//!
//! Every flat position `row * width + t` of a packed batch belongs to one *segment*: a
//! document, or the padding at a row's end (attending to itself, harmless: nothing
//! reads its outputs). Two layouts of the segments are kept, both made on the host when
//! the batch is built (off the training thread):
//! - `cu_seqlens`, the segments' cumulative starts over the flat positions: what
//!   libtorch's variable-length flash attention takes on CUDA (`flash_varlen`);
//! - buckets of segments of similar length, each gathered into `[count, len]` slots
//!   (a segment shorter than its bucket is right-padded by repeating its last position:
//!   under causal attention no real query sees those slots), so that one causal SDPA
//!   call per bucket does every document in it, and a scatter index that puts each
//!   position's output back. This runs everywhere, the CPU included, with SDPA's
//!   memory-linear kernels. Bucket lengths are rounded up by at most 1/8 above 64
//!   tokens, so the padded slots add at most ~27% to a document's attention.
use tch::{Device, Kind, Tensor};

/// Documents of at most this many tokens share one bucket (their attention is cheap
/// next to the projections; fewer buckets mean fewer, larger SDPA calls).
const SHORT_BUCKET: usize = 64;

/// One bucket: `count` segments, each given `len` slots.
pub struct DocBucket {
    pub len: i64,
    pub count: i64,
    /// `[count * len]` int64 flat positions, or `None` when they are `offset..offset +
    /// count * len` in order (segments of exactly `len` tokens laid end to end), which
    /// needs no gather.
    pub gather: Option<Tensor>,
    pub offset: i64,
}

/// The segments of a packed batch `[rows, width]`, laid out for per-document attention.
pub struct PackedDocuments {
    /// `[segments + 1]` int32 cumulative starts over the flat positions.
    pub cu_seqlens: Tensor,
    /// The longest segment.
    pub max_len: i64,
    pub buckets: Vec<DocBucket>,
    /// `[rows * width]` int64: each flat position's slot in the buckets' outputs laid
    /// end to end; `None` when that is the identity.
    pub scatter: Option<Tensor>,
}

/// The padded length of a segment of `len` tokens in its bucket.
fn bucket_len(len: usize) -> usize {
    if len <= SHORT_BUCKET {
        return SHORT_BUCKET;
    }
    let step = 1usize << (usize::BITS - 1 - len.leading_zeros()).saturating_sub(3);
    len.div_ceil(step) * step
}

impl PackedDocuments {
    /// The layout of rows of `width` slots whose documents have `doc_lengths[row]`
    /// tokens each (laid from the row's start; the rest of the row is padding).
    pub fn new(doc_lengths: &[Vec<u32>], width: usize) -> Self {
        let mut segments: Vec<(usize, usize)> = vec![]; // (flat start, length)
        for (r, docs) in doc_lengths.iter().enumerate() {
            let mut start = r * width;
            for &n in docs {
                segments.push((start, n as usize));
                start += n as usize;
            }
            let end = (r + 1) * width;
            assert!(start <= end, "row {r}: documents of {} tokens in a row of {width}", start - r * width);
            if start < end {
                segments.push((start, end - start));
            }
        }
        let mut cu = vec![0i32];
        for &(start, n) in &segments {
            cu.push(i32::try_from(start + n).expect("a packed batch has fewer than 2^31 positions"));
        }
        let max_len = segments.iter().map(|s| s.1).max().unwrap_or(0) as i64;
        // Segments by bucket length (stable: in flat order within a bucket).
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&i| bucket_len(segments[i].1));
        let total = doc_lengths.len() * width;
        let mut scatter = vec![0i64; total];
        let mut buckets = vec![];
        let mut slot = 0usize;
        let mut i = 0;
        while i < order.len() {
            let len = bucket_len(segments[order[i]].1);
            let members: Vec<usize> =
                order[i..].iter().copied().take_while(|&s| bucket_len(segments[s].1) == len).collect();
            i += members.len();
            // Long documents keep their exact length when every member has it.
            let len = if members.iter().all(|&s| segments[s].1 == segments[members[0]].1) {
                segments[members[0]].1
            } else {
                len
            };
            let offset = slot;
            let mut gather = Vec::with_capacity(members.len() * len);
            for &s in &members {
                let (start, n) = segments[s];
                for t in 0..len {
                    gather.push((start + t.min(n - 1)) as i64);
                }
                for t in 0..n {
                    scatter[start + t] = (slot + t) as i64;
                }
                slot += len;
            }
            let identity = gather.iter().enumerate().all(|(j, &g)| g == (offset + j) as i64);
            buckets.push(DocBucket {
                len: len as i64,
                count: members.len() as i64,
                gather: (!identity).then(|| Tensor::from_slice(&gather)),
                offset: offset as i64,
            });
        }
        let identity = slot == total && scatter.iter().enumerate().all(|(j, &s)| s == j as i64);
        PackedDocuments {
            cu_seqlens: Tensor::from_slice(&cu),
            max_len,
            buckets,
            scatter: (!identity).then(|| Tensor::from_slice(&scatter)),
        }
    }

    /// `f` applied to every tensor (moving, pinning).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        PackedDocuments {
            cu_seqlens: f(&self.cu_seqlens),
            max_len: self.max_len,
            buckets: self
                .buckets
                .iter()
                .map(|b| DocBucket { len: b.len, count: b.count, gather: b.gather.as_ref().map(&f), offset: b.offset })
                .collect(),
            scatter: self.scatter.as_ref().map(&f),
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        self.map(|t| t.to_device(device))
    }

    /// Slots in all buckets (>= the batch's positions; the excess is bucket padding).
    pub fn slots(&self) -> i64 {
        self.buckets.iter().map(|b| b.count * b.len).sum()
    }

    /// Bucket `b`'s rows of `flat` `[positions, ...]`: `[count * len, ...]`.
    pub fn gather(&self, b: usize, flat: &Tensor) -> Tensor {
        let bucket = &self.buckets[b];
        match &bucket.gather {
            Some(index) => flat.index_select(0, index),
            None => flat.narrow(0, bucket.offset, bucket.count * bucket.len),
        }
    }

    /// The buckets' outputs `[slots, ...]` (laid end to end in bucket order) back in
    /// flat position order `[positions, ...]`.
    pub fn scatter(&self, outputs: &Tensor) -> Tensor {
        match &self.scatter {
            Some(index) => outputs.index_select(0, index),
            None => outputs.shallow_clone(),
        }
    }

    /// A boolean `[len, len]` band (true = may attend): causal within `window` tokens.
    pub fn window_mask(len: i64, window: usize, device: Device) -> Tensor {
        let i = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(1);
        let j = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0);
        j.le_tensor(&i).logical_and(&(&i - &j).lt(window as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.to_kind(Kind::Int64)).unwrap()
    }

    #[test]
    fn bucket_lengths_round_up_by_at_most_an_eighth() {
        assert_eq!(bucket_len(1), 64);
        assert_eq!(bucket_len(64), 64);
        assert_eq!(bucket_len(65), 72);
        assert_eq!(bucket_len(256), 256);
        assert_eq!(bucket_len(257), 288);
        for len in 65..5000 {
            let b = bucket_len(len);
            assert!(b >= len && (b - len) * 8 <= len, "{len} -> {b}");
        }
    }

    #[test]
    fn every_position_comes_back_to_its_place() {
        // Row 0: documents of 3 and 70 tokens, 7 of padding; row 1: one of 80 tokens.
        let docs = PackedDocuments::new(&[vec![3, 70], vec![80]], 80);
        assert_eq!(ints(&docs.cu_seqlens), [0, 3, 73, 80, 160]);
        assert_eq!(docs.max_len, 80);
        // The 3-token document and the padding share the short bucket; 70 and 80 have
        // their own (a bucket of one length keeps it exactly).
        let lens: Vec<(i64, i64)> = docs.buckets.iter().map(|b| (b.len, b.count)).collect();
        assert_eq!(lens, [(64, 2), (70, 1), (80, 1)]);
        let flat = Tensor::arange(160, (Kind::Int64, Device::Cpu));
        let outputs: Vec<Tensor> = (0..docs.buckets.len()).map(|b| docs.gather(b, &flat)).collect();
        let joined = Tensor::cat(&outputs, 0);
        assert_eq!(ints(&docs.scatter(&joined)), ints(&flat));
        // A slot past a document's end repeats its last position (never a later one).
        let first = ints(&outputs[0]);
        assert_eq!(&first[..4], [0, 1, 2, 2]);
        assert_eq!(first[64], 73);
    }

    /// Packed rows of documents of several bucket lengths (with padding) give every
    /// document the hidden states and parameter gradients it has alone, for grouped
    /// heads (Qwen3), sliding windows shorter than some documents (Mistral) and
    /// soft-capped attention with windows (Gemma 2).
    #[test]
    fn packed_documents_attend_as_if_alone() {
        use crate::model::{CausalLm, ForwardInput, ModelConfig};
        let common = serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": true,
        });
        let family = |extra: serde_json::Value| {
            let mut c = common.clone();
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            ModelConfig::from_value(c).unwrap()
        };
        let configs = [
            family(serde_json::json!({"model_type": "qwen3"})),
            family(serde_json::json!({"model_type": "mistral", "sliding_window": 12})),
            family(serde_json::json!({"model_type": "gemma2", "sliding_window": 12, "query_pre_attn_scalar": 8,
                "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0})),
        ];
        // Row 0: 5 + 70 + 20 tokens and 5 of padding; row 1: 90 tokens and 10 of padding.
        let docs = [vec![5u32, 70, 20], vec![90]];
        let width = 100;
        for config in configs {
            tch::manual_seed(5);
            let model = CausalLm::random(config, Device::Cpu, Kind::Float).unwrap();
            let ids = Tensor::randint(50, [2, width], (Kind::Int64, Device::Cpu));
            let mut positions = vec![0i64; 2 * width as usize];
            let mut mask = vec![0i64; 2 * width as usize];
            let mut spans = vec![]; // (row, start, len)
            for (r, row) in docs.iter().enumerate() {
                let mut at = 0;
                for &n in row {
                    for t in 0..n as usize {
                        positions[r * width as usize + at + t] = t as i64;
                        mask[r * width as usize + at + t] = 1;
                    }
                    spans.push((r as i64, at as i64, n as i64));
                    at += n as usize;
                }
            }
            let (positions, mask) =
                (Tensor::from_slice(&positions).view([2, width]), Tensor::from_slice(&mask).view([2, width]));
            let layout = PackedDocuments::new(&docs, width as usize);
            let weights = Tensor::randn([2, width, 16], (Kind::Float, Device::Cpu));
            let grads = |run: &dyn Fn() -> Tensor| -> Vec<Tensor> {
                let vars: Vec<Tensor> = model.vs.trainable_variables();
                for v in &vars {
                    let mut g = v.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                run().backward();
                vars.iter().map(|v| v.grad().copy()).collect()
            };
            let input = ForwardInput {
                input_ids: &ids,
                attention_mask: Some(&mask),
                position_ids: Some(&positions),
                documents: Some(&layout),
            };
            let packed = model.transformer.forward_hidden(&input, &[]).unwrap().last;
            let packed_grads = grads(&|| {
                let last = model.transformer.forward_hidden(&input, &[]).unwrap().last;
                (last * &weights * mask.unsqueeze(-1)).sum(Kind::Float)
            });
            let mut alone_outputs = vec![];
            let alone_grads = grads(&|| {
                let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
                for &(r, start, n) in &spans {
                    let doc = ids.get(r).narrow(0, start, n).unsqueeze(0);
                    let last = model.transformer.forward_hidden(&ForwardInput::new(&doc, None), &[]).unwrap().last;
                    total += (&last * weights.get(r).narrow(0, start, n).unsqueeze(0)).sum(Kind::Float);
                }
                total
            });
            for &(r, start, n) in &spans {
                let doc = ids.get(r).narrow(0, start, n).unsqueeze(0);
                alone_outputs.push(model.transformer.forward_hidden(&ForwardInput::new(&doc, None), &[]).unwrap().last);
            }
            for (&(r, start, n), alone) in spans.iter().zip(&alone_outputs) {
                let mine = packed.get(r).narrow(0, start, n).unsqueeze(0);
                let diff = (&mine - alone).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "document at row {r}, {start}..{}: max |difference| {diff:e}", start + n);
            }
            for (a, b) in packed_grads.iter().zip(&alone_grads) {
                let scale = b.abs().max().double_value(&[]);
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale.max(1e-12), "gradient: max |difference| {diff:e} vs max {scale:e}");
            }
        }
    }

    #[test]
    fn whole_rows_of_equal_documents_need_no_gather() {
        let docs = PackedDocuments::new(&[vec![256; 4], vec![256; 4]], 1024);
        assert_eq!(docs.buckets.len(), 1);
        assert!(docs.buckets[0].gather.is_none() && docs.scatter.is_none());
        assert_eq!((docs.buckets[0].len, docs.buckets[0].count), (256, 8));
        assert_eq!(docs.slots(), 2048);
    }
}
