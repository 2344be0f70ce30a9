//! Drawing token ids from logits, reproducibly: uniform numbers that are a function of
//! (seed, row, position) alone (splitmix64), and the inverse CDF summed in float64. Shared
//! by the precompute tail draws and by sampled generation, so that a resumed run, another
//! batch size or another device draws the same ids.
use tch::{Kind, Tensor};

/// The `count` uniform numbers in [0, 1) of the draws at trained position `position` of
/// the row `row_index`: a function of the seed, the row and the position alone, so a
/// resumed run, another batch size or another device draws the same ids.
pub fn draw_uniforms(seed: u64, row_index: u64, position: u64, count: usize) -> Vec<f64> {
    let mut state = splitmix64(seed ^ splitmix64(row_index ^ splitmix64(position.wrapping_add(0x5851_f42d))));
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Positions per float64 cumulative sum: 256 x a 150k vocabulary is 300 MB.
const DRAW_ROWS: i64 = 256;

/// Ids `[n, m]` drawn by inverse CDF from `softmax(logits)` `[n, V]` (masked entries
/// -inf: never drawn), one per uniform number `[n, m]`. The CDF is summed in float64,
/// so even ids of probability 1e-12 are drawn at their rate.
pub fn draw_from_logits(logits: &Tensor, uniforms: &Tensor) -> Tensor {
    let (rows, vocab) = (logits.size()[0], logits.size()[1]);
    let mut out = vec![];
    let mut start = 0;
    while start < rows {
        let n = DRAW_ROWS.min(rows - start);
        let z = logits.narrow(0, start, n);
        let p = (&z - z.logsumexp([-1], true)).exp();
        let cdf = p.cumsum(-1, Kind::Double);
        let x = uniforms.narrow(0, start, n).to_kind(Kind::Double) * cdf.narrow(-1, vocab - 1, 1);
        // The first id whose CDF exceeds x: its own probability is above 0.
        out.push(x.searchsorted(&cdf, false, true, "right", None::<Tensor>).clamp_max(vocab - 1));
        start += n;
    }
    if out.is_empty() {
        Tensor::zeros([0, uniforms.size()[1]], (Kind::Int64, logits.device()))
    } else {
        Tensor::cat(&out, 0)
    }
}
