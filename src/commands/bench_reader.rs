//! `distill bench-reader`: how fast the shard reader decodes a set, as `train` reads it.
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use distill::batch::stream::{RowStream, StreamOptions, StreamPosition};
use distill::shards::reader::ShardSet;

/// Streams one epoch of a shard set the way `train` reads it (shuffled, decoded on the
/// rayon pool) and prints the decode rate, to compare with the trainer's tokens/s.
#[derive(Args)]
pub struct BenchReaderArgs {
    #[arg(long)]
    shards: PathBuf,
    /// Row groups shuffled together.
    #[arg(long, default_value_t = 8)]
    window: usize,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
}

pub fn run(args: BenchReaderArgs) -> Result<()> {
    let set = Arc::new(ShardSet::open(&args.shards, false)?);
    let opts = StreamOptions { seed: 0, window: args.window, prefetch: 2, epochs: Some(args.epochs), shuffle: true };
    let started = Instant::now();
    let (mut rows, mut tokens, mut targets) = (0usize, 0usize, 0usize);
    for row in RowStream::new(set, opts, StreamPosition::default()) {
        let row = row?;
        rows += 1;
        tokens += row.sequence.len();
        targets += row.num_targets();
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "read {rows} rows, {tokens} tokens ({targets} targets) in {secs:.2}s: {:.0} tokens/s on {} rayon threads",
        tokens as f64 / secs,
        rayon::current_num_threads()
    );
    Ok(())
}
