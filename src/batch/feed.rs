//! Rows from the stream -> micro-batches of host tensors, built on a thread ahead of the
//! trainer (padding or packing, teacher targets, teacher hidden states; page-locked for
//! CUDA so the copy to the device is asynchronous). Each micro-batch carries the stream
//! position after it, which is what a checkpoint stores.
use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver};
use tch::{Device, Tensor};

use super::stream::{RowStream, StreamPosition};
use super::targets::{teacher_targets, uld_batch, TargetOptions};
use super::{move_tensor, PaddedBatch};
use crate::losses::uld::UldBatch;
use crate::losses::TeacherTargets;
use crate::shards::row::ShardRow;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedOptions {
    /// Padded tokens per micro-batch (rows x width).
    pub batch_tokens: usize,
    /// Pack several shard rows into each batch row of this many tokens (block-diagonal
    /// attention, positions restarting per document), instead of one row per batch row.
    pub pack_to: Option<usize>,
}

/// Rows from the stream grouped into batches; a row that does not fit waits for the next
/// batch, and `position` accounts for it.
pub struct Feed {
    stream: RowStream,
    pending: Option<(ShardRow, StreamPosition)>,
    opts: FeedOptions,
}

impl Feed {
    pub fn new(stream: RowStream, opts: FeedOptions) -> Self {
        Feed { stream, pending: None, opts }
    }

    /// Position of the next row not yet in a batch.
    pub fn position(&self) -> StreamPosition {
        self.pending.as_ref().map(|p| p.1).unwrap_or_else(|| self.stream.position())
    }

    fn next_row(&mut self) -> Result<Option<(ShardRow, StreamPosition)>> {
        if let Some(p) = self.pending.take() {
            return Ok(Some(p));
        }
        let at = self.stream.position();
        Ok(match self.stream.next() {
            Some(row) => Some((row?, at)),
            None => None,
        })
    }

    /// The next batch: each inner vector is one batch row (several shard rows when
    /// packing). `None` when the stream has ended.
    pub fn take_batch(&mut self) -> Result<Option<Vec<Vec<ShardRow>>>> {
        let mut bins: Vec<(usize, Vec<ShardRow>)> = vec![];
        let mut width = 0;
        while let Some((row, at)) = self.next_row()? {
            let len = row.sequence.len();
            let fits = match self.opts.pack_to {
                // First fit into an open batch row, else a new one while there is room.
                Some(seq) => match bins.iter().position(|(used, _)| used + len <= seq) {
                    Some(b) => Some(b),
                    None if bins.is_empty() || (bins.len() + 1) * seq.max(width) <= self.opts.batch_tokens => {
                        bins.push((0, vec![]));
                        Some(bins.len() - 1)
                    }
                    None => None,
                },
                None if bins.is_empty() || width.max(len) * (bins.len() + 1) <= self.opts.batch_tokens => {
                    bins.push((0, vec![]));
                    Some(bins.len() - 1)
                }
                None => None,
            };
            let Some(b) = fits else {
                self.pending = Some((row, at));
                break;
            };
            bins[b].0 += len;
            width = width.max(bins[b].0);
            bins[b].1.push(row);
        }
        Ok((!bins.is_empty()).then(|| bins.into_iter().map(|b| b.1).collect()))
    }
}

/// One micro-batch as tensors (host tensors until `to_device`).
pub struct MicroBatch {
    pub batch: PaddedBatch,
    /// Teacher top-k targets of the trained positions, in `batch.predicting` order.
    pub teacher: Option<TeacherTargets>,
    /// Teacher hidden states `[targets, width]` float32, one per requested layer.
    pub teacher_hidden: Vec<Tensor>,
    /// ULD targets of a cross-tokenizer set (`train --cross-tokenizer`).
    pub uld: Option<UldBatch>,
    /// Shard row numbers in the batch, in the order their targets follow.
    pub row_indices: Vec<u64>,
    /// Per shard row of `row_indices`: the trained positions of each of its documents
    /// (figures per document's teacher in `eval`).
    pub doc_targets: Vec<Vec<usize>>,
    /// Real (unpadded) tokens, and trained tokens.
    pub tokens: usize,
    pub targets: usize,
    /// Stream position after this batch.
    pub position: StreamPosition,
}

/// What a micro-batch needs besides tokens.
#[derive(Debug, Clone)]
pub struct BatchContent {
    /// Teacher targets, built so (`None`: none, plain SFT).
    pub teacher: Option<TargetOptions>,
    pub hidden_layers: Vec<usize>,
    /// ULD targets (cross-tokenizer sets).
    pub uld: bool,
}

impl MicroBatch {
    pub fn build(rows: Vec<Vec<ShardRow>>, content: &BatchContent, position: StreamPosition) -> Result<Self> {
        let row_indices = rows.iter().flatten().map(|r| r.sequence.row_index).collect();
        let doc_targets = rows.iter().flatten().map(|r| r.sequence.targets_per_document()).collect();
        let merged: Vec<ShardRow> = rows.into_iter().map(concat_rows).collect();
        let sequences: Vec<_> = merged.iter().map(|r| &r.sequence).collect();
        let batch = PaddedBatch::host(&sequences);
        let targets: usize = merged.iter().map(ShardRow::num_targets).sum();
        let predicting = batch.predicting.size()[0] as usize;
        if predicting != targets {
            bail!("rows {row_indices:?}: {targets} stored targets but {predicting} masked tokens");
        }
        Ok(MicroBatch {
            teacher: content.teacher.map(|opts| teacher_targets(&merged, opts)),
            teacher_hidden: content.hidden_layers.iter().map(|&l| teacher_hidden(&merged, l)).collect::<Result<_>>()?,
            uld: match content.uld {
                true => Some(uld_batch(&merged).context("the rows hold no ULD targets: not a cross-tokenizer set")?),
                false => None,
            },
            row_indices,
            doc_targets,
            tokens: merged.iter().map(|r| r.sequence.len()).sum(),
            targets,
            batch,
            position,
        })
    }

    /// All tensors on `device`; from page-locked memory when pinned, without blocking.
    pub fn to_device(&self, device: Device, non_blocking: bool) -> MicroBatch {
        self.map(|t| move_tensor(t, device, non_blocking))
    }

    fn pin(&self, device: Device) -> MicroBatch {
        self.map(|t| t.pin_memory(device))
    }

    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> MicroBatch {
        MicroBatch {
            batch: self.batch.map(&f),
            teacher: self.teacher.as_ref().map(|t| t.map(&f)),
            teacher_hidden: self.teacher_hidden.iter().map(&f).collect(),
            uld: self.uld.as_ref().map(|u| u.map(&f)),
            row_indices: self.row_indices.clone(),
            doc_targets: self.doc_targets.clone(),
            tokens: self.tokens,
            targets: self.targets,
            position: self.position,
        }
    }
}

/// Shard rows laid end to end as one batch row (see `ShardRow::append`).
fn concat_rows(rows: Vec<ShardRow>) -> ShardRow {
    let mut rows = rows.into_iter();
    let mut out = rows.next().expect("a batch row holds at least one shard row");
    for r in rows {
        out.append(r);
    }
    out
}

/// The teacher's hidden state `layer` of the rows' trained positions, `[targets, width]`,
/// in float32 (stored value times stored RMS).
fn teacher_hidden(rows: &[ShardRow], layer: usize) -> Result<Tensor> {
    let mut values = vec![];
    let mut rms = vec![];
    for r in rows {
        let Some(h) = r.hidden.iter().find(|h| h.layer == layer) else {
            bail!("row {} has no hidden state {layer}: the shards hold other layers", r.sequence.row_index);
        };
        values.extend(h.values.iter().map(|x| x.to_f32()));
        rms.extend_from_slice(&h.rms);
    }
    let n = rms.len() as i64;
    let width = if n > 0 { values.len() as i64 / n } else { 1 };
    Ok(Tensor::from_slice(&values).view([n, width]) * Tensor::from_slice(&rms).view([n, 1]))
}

/// Which micro-batches of the stream a process builds when several share it: number i
/// goes to process `i % of`; the others are only counted (see `BatchCounts`). Every
/// process reads the same stream, so together they see exactly the batches one
/// process would, in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub index: usize,
    pub of: usize,
}

impl Share {
    pub const ALL: Share = Share { index: 0, of: 1 };
}

/// What every process knows of a micro-batch, whoever builds it (the step's token count
/// over all processes normalises the loss; the position is where the stream stands).
#[derive(Debug, Clone, Copy)]
pub struct BatchCounts {
    pub tokens: usize,
    pub targets: usize,
    /// Batch rows x width, padding included.
    pub padded: usize,
    pub position: StreamPosition,
}

impl BatchCounts {
    fn of(rows: &[Vec<ShardRow>], position: StreamPosition) -> Self {
        let lens: Vec<usize> = rows.iter().map(|r| r.iter().map(|s| s.sequence.len()).sum()).collect();
        BatchCounts {
            tokens: lens.iter().sum(),
            targets: rows.iter().flatten().map(ShardRow::num_targets).sum(),
            padded: lens.len() * lens.iter().copied().max().unwrap_or(0),
            position,
        }
    }
}

/// A micro-batch of the stream: built here, or only counted (another process builds it).
pub enum Loaded {
    Mine(Box<MicroBatch>),
    Peer(BatchCounts),
}

impl Loaded {
    pub fn counts(&self) -> BatchCounts {
        match self {
            Loaded::Mine(m) => {
                BatchCounts { tokens: m.tokens, targets: m.targets, padded: m.batch.ids.numel(), position: m.position }
            }
            Loaded::Peer(p) => *p,
        }
    }
}

/// Micro-batches built on a thread, at most `prefetch` ahead, page-locked for CUDA.
pub struct BatchLoader {
    rx: Receiver<Result<Option<Loaded>>>,
}

impl BatchLoader {
    pub fn new(feed: Feed, content: BatchContent, device: Device, prefetch: usize) -> Self {
        Self::shared(feed, content, device, prefetch, Share::ALL)
    }

    /// Builds only this process's `share` of the micro-batches.
    pub fn shared(mut feed: Feed, content: BatchContent, device: Device, prefetch: usize, share: Share) -> Self {
        let (tx, rx) = bounded(prefetch.max(1));
        std::thread::spawn(move || {
            crate::runtime::serial_torch_on_this_thread();
            for i in 0usize.. {
                let next = feed.take_batch().and_then(|rows| match rows {
                    None => Ok(None),
                    Some(rows) if i % share.of != share.index => {
                        Ok(Some(Loaded::Peer(BatchCounts::of(&rows, feed.position()))))
                    }
                    Some(rows) => {
                        let mb = MicroBatch::build(rows, &content, feed.position())?;
                        Ok(Some(Loaded::Mine(Box::new(if device.is_cuda() { mb.pin(device) } else { mb }))))
                    }
                });
                let stop = !matches!(next, Ok(Some(_)));
                if tx.send(next).is_err() || stop {
                    return;
                }
            }
        });
        BatchLoader { rx }
    }

    /// The next micro-batch (host tensors); `None` when the stream has ended. For a
    /// loader of all micro-batches (`new`).
    pub fn next(&self) -> Result<Option<MicroBatch>> {
        match self.next_loaded()? {
            None => Ok(None),
            Some(Loaded::Mine(m)) => Ok(Some(*m)),
            Some(Loaded::Peer(_)) => bail!("BatchLoader::next on a loader that builds a share of the batches"),
        }
    }

    /// The next micro-batch of the stream, built or counted.
    pub fn next_loaded(&self) -> Result<Option<Loaded>> {
        match self.rx.recv() {
            Ok(next) => next,
            Err(_) => bail!("the batch loader stopped"),
        }
    }
}
