//! The head applied to many positions a chunk at a time, so that `[positions, vocab]`
//! float32 logits never exist at once. One policy decides the chunk for every caller
//! (capture, scoring, evaluation, the training head + loss): positions whose float32
//! logits fill a memory budget that depends on the device.
//!
//! On a CPU, 64 MiB chunks are the measured best for training (2048 positions of a 49k
//! vocabulary ran 30% slower than 256 on 2 cores: page faults on fresh buffers); on a
//! GPU, larger chunks only amortise kernel launches, and 256 MiB keeps the head's
//! transient memory small next to a student's activations.
use anyhow::Result;
use std::ops::Range;
use tch::{Device, Tensor};

use super::Transformer;

/// Bytes of float32 logits one chunk may take (`None` in options: this default).
pub fn default_logits_budget(device: Device) -> usize {
    if device.is_cuda() {
        256 << 20
    } else {
        64 << 20
    }
}

/// Fewest positions per chunk, whatever the budget: smaller matrix products run far
/// below the machine's rate.
pub const MIN_CHUNK_POSITIONS: i64 = 64;

/// Positions per head chunk for `vocab` logits within `budget` bytes of float32.
pub fn chunk_positions(vocab: usize, budget: usize) -> i64 {
    ((budget / (4 * vocab.max(1))) as i64).max(MIN_CHUNK_POSITIONS)
}

impl Transformer {
    /// Calls `f(logits, rows)` for consecutive chunks of at most `chunk` rows of
    /// `hidden` `[positions, width]` (final normed states), without gradients; `logits`
    /// are `[rows.len(), vocab]` in the model's dtype.
    pub fn logits_in_chunks(
        &self,
        hidden: &Tensor,
        chunk: i64,
        mut f: impl FnMut(&Tensor, Range<i64>) -> Result<()>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let positions = hidden.size()[0];
        let mut start = 0;
        while start < positions {
            let n = chunk.max(1).min(positions - start);
            f(&self.logits(&hidden.narrow(0, start, n)), start..start + n)?;
            start += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_the_budget_with_a_floor() {
        assert_eq!(chunk_positions(49_152, 64 << 20), 341);
        assert_eq!(chunk_positions(384, 64 << 20), 43_690);
        assert_eq!(chunk_positions(262_144 * 4, 64 << 20), MIN_CHUNK_POSITIONS);
        assert!(default_logits_budget(Device::Cuda(0)) > default_logits_budget(Device::Cpu));
    }
}
