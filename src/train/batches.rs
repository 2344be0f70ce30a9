//! The micro-batches a run trains on: the shards' row stream from a checkpoint's position,
//! packed or padded as the run says, built ahead on a thread (and shared out among the
//! ranks of a data-parallel job).
use std::sync::Arc;

use super::checkpoint::TrainerState;
use super::config::TrainConfig;
use super::hidden::HiddenDistill;
use crate::batch::feed::{BatchContent, BatchLoader, Feed, FeedOptions, Share};
use crate::batch::stream::{RowStream, StreamOptions};
use crate::batch::targets::TargetOptions;
use crate::shards::reader::ShardSet;

/// Micro-batches from the stream position of `state`, built ahead on a thread.
pub(super) fn batch_loader(
    cfg: &TrainConfig,
    set: &Arc<ShardSet>,
    targets: Option<TargetOptions>,
    hidden: Option<&HiddenDistill>,
    state: &TrainerState,
    share: Share,
) -> BatchLoader {
    let stream = RowStream::new(
        set.clone(),
        StreamOptions { seed: cfg.seed, window: 8, prefetch: 2, epochs: None, shuffle: cfg.shuffle },
        state.position,
    );
    let content = BatchContent {
        teacher: targets,
        hidden_layers: hidden.map(|h| h.teacher_layers()).unwrap_or_default(),
        // A set moved to the student's tokens (by --cross-tokenizer or cross-tokenize).
        uld: set.manifest.settings.capture.cross_tokenizer.is_some() && targets.is_some(),
    };
    let pack_to = cfg.pack_to(set.manifest.settings.data.max_len);
    let feed = Feed::new(stream, FeedOptions { batch_tokens: cfg.batch_tokens, pack_to });
    BatchLoader::shared(feed, content, cfg.device, 2 * cfg.grad_accum.max(1) * share.of, share)
}
