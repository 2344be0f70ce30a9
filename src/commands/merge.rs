//! `distill merge-shards`: join the shard sets of a sliced precompute into one.
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeArgs {
    /// Output directory for the merged shard set.
    #[arg(long)]
    output: PathBuf,
    /// Shard sets of the slices (each made with --shard-index i --num-shards n).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let m = distill::shards::merge::merge(&args.inputs, &args.output)?;
    println!(
        "merged {} slices into {}: {} shards, {} tokens",
        m.slices.len(),
        args.output.display(),
        m.shards.len(),
        m.total_tokens()
    );
    Ok(())
}
