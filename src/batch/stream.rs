//! The order in which training sees rows: row groups shuffled per epoch, then rows
//! shuffled within windows of `window` row groups (a shuffle buffer whose content is a
//! pure function of seed, epoch and window, so any position can be restarted exactly).
//! Windows are decoded ahead on the rayon pool and handed over through a bounded queue.
use anyhow::Result;
use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::shards::reader::{RowGroupRef, ShardSet};
use crate::shards::row::ShardRow;

/// Where the stream stands: the next row is row `row` of window `window` of `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: u64,
    pub window: usize,
    pub row: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub seed: u64,
    /// Row groups shuffled together (the shuffle buffer).
    pub window: usize,
    /// Decoded windows kept ready ahead of the consumer.
    pub prefetch: usize,
    /// Stop after this many epochs (`None`: forever).
    pub epochs: Option<u64>,
    /// Shuffle (the default); `false` keeps the shards' order, every epoch.
    pub shuffle: bool,
}

/// SplitMix64: small, fast, and stable across versions (restarts depend on it).
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(parts: &[u64]) -> Self {
        let mut s = SplitMix64(0x9E37_79B9_7F4A_7C15);
        for &p in parts {
            s.0 ^= p;
            s.next();
        }
        s
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The row groups of each window of `epoch`, in order.
pub fn epoch_windows(groups: &[RowGroupRef], opts: &StreamOptions, epoch: u64) -> Vec<Vec<RowGroupRef>> {
    let mut order = groups.to_vec();
    if opts.shuffle {
        SplitMix64::new(&[opts.seed, epoch]).shuffle(&mut order);
    }
    order.chunks(opts.window.max(1)).map(<[RowGroupRef]>::to_vec).collect()
}

/// Decodes a window's row groups in parallel and shuffles its rows.
fn decode_window(
    set: &ShardSet,
    groups: &[RowGroupRef],
    opts: &StreamOptions,
    epoch: u64,
    index: usize,
) -> Result<Vec<ShardRow>> {
    let parts: Vec<Vec<ShardRow>> = groups.par_iter().map(|&g| set.decode(g)).collect::<Result<_>>()?;
    let mut rows: Vec<ShardRow> = parts.into_iter().flatten().collect();
    if opts.shuffle {
        SplitMix64::new(&[opts.seed, epoch, index as u64, 1]).shuffle(&mut rows);
    }
    Ok(rows)
}

/// Rows in training order from `start`, each with the position that follows it (what a
/// checkpoint stores to resume after that row).
pub struct RowStream {
    rx: Receiver<Result<(StreamPosition, Vec<ShardRow>)>>,
    current: std::vec::IntoIter<ShardRow>,
    position: StreamPosition,
    window_len: usize,
}

impl RowStream {
    pub fn new(set: Arc<ShardSet>, opts: StreamOptions, start: StreamPosition) -> Self {
        let (tx, rx) = bounded(opts.prefetch.max(1));
        std::thread::spawn(move || {
            if set.row_groups().iter().all(|g| g.rows == 0) {
                // An endless stream of empty epochs would spin forever.
                let _ = tx.send(Err(anyhow::anyhow!("{}: the shard set holds no rows", set.dir.display())));
                return;
            }
            let mut pos = start;
            loop {
                if opts.epochs.is_some_and(|n| pos.epoch >= n) {
                    return;
                }
                let windows = epoch_windows(set.row_groups(), &opts, pos.epoch);
                for (w, groups) in windows.iter().enumerate().skip(pos.window) {
                    let decoded = decode_window(&set, groups, &opts, pos.epoch, w);
                    let at =
                        StreamPosition { epoch: pos.epoch, window: w, row: if w == pos.window { pos.row } else { 0 } };
                    let failed = decoded.is_err();
                    if tx.send(decoded.map(|rows| (at, rows))).is_err() || failed {
                        return;
                    }
                }
                pos = StreamPosition { epoch: pos.epoch + 1, window: 0, row: 0 };
            }
        });
        RowStream { rx, current: Vec::new().into_iter(), position: start, window_len: 0 }
    }

    /// Position of the next row.
    pub fn position(&self) -> StreamPosition {
        self.position
    }
}

impl Iterator for RowStream {
    type Item = Result<ShardRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.current.next() {
                self.position.row += 1;
                if self.position.row == self.window_len {
                    self.position =
                        StreamPosition { epoch: self.position.epoch, window: self.position.window + 1, row: 0 };
                }
                return Some(Ok(row));
            }
            match self.rx.recv().ok()? {
                Err(e) => return Some(Err(e)),
                Ok((at, rows)) => {
                    self.window_len = rows.len();
                    let mut it = rows.into_iter();
                    for _ in 0..at.row {
                        it.next();
                    }
                    self.position = at;
                    self.current = it;
                    if at.row >= self.window_len {
                        self.position = StreamPosition { epoch: at.epoch, window: at.window + 1, row: 0 };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_permutations_and_differ_by_epoch() {
        let groups: Vec<RowGroupRef> =
            (0..10).map(|i| RowGroupRef { shard: i / 4, row_group: i % 4, rows: 3 }).collect();
        let opts = StreamOptions { seed: 7, window: 3, prefetch: 1, epochs: None, shuffle: true };
        let e0: Vec<RowGroupRef> = epoch_windows(&groups, &opts, 0).concat();
        let e1: Vec<RowGroupRef> = epoch_windows(&groups, &opts, 1).concat();
        let sorted = |mut v: Vec<RowGroupRef>| {
            v.sort_by_key(|g| (g.shard, g.row_group));
            v
        };
        assert_eq!(sorted(e0.clone()), groups);
        assert_eq!(sorted(e1.clone()), groups);
        assert_ne!(e0, e1);
        assert_eq!(epoch_windows(&groups, &opts, 0).concat(), e0, "deterministic");
        assert_eq!(epoch_windows(&groups, &opts, 0).len(), 4);
        let in_order = StreamOptions { shuffle: false, ..opts };
        assert_eq!(epoch_windows(&groups, &in_order, 5).concat(), groups, "shuffle off keeps the shards' order");
    }
}
