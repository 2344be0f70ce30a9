//! `distill cross-tokenize`: a teacher's shard set moved to a student's tokenizer, as
//! `train --cross-tokenizer` makes it in its run directory; for held-out shards that
//! `eval` scores by ULD, or to look at the alignment with Arrow tools first.
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CrossTokenizeArgs {
    /// The teacher's shard set.
    #[arg(long)]
    shards: PathBuf,
    /// The student model directory (its tokenizer.json).
    #[arg(long)]
    student: PathBuf,
    /// Output directory (absent or empty; a finished set with the same settings is reused).
    #[arg(long)]
    output: PathBuf,
    /// The tokenizer the shards were made with [default: the teacher's path in the manifest].
    #[arg(long)]
    teacher_tokenizer: Option<PathBuf>,
}

pub fn run(args: CrossTokenizeArgs) -> Result<()> {
    let made = distill::align::set::student_targets(
        &args.shards,
        args.teacher_tokenizer.as_deref(),
        &args.student,
        &args.output,
    )?;
    let m = &made.manifest;
    let rows: usize = m.shards.iter().map(|e| e.rows).sum();
    match made.stats {
        Some(s) => println!(
            "{}: {rows} rows, {} tokens in the student's tokens; {} groups ({} of one token on each side) cover {} of the teacher's {} targets; {} teacher ids match a student id",
            args.output.display(),
            m.total_tokens(),
            s.groups,
            s.one_to_one,
            s.aligned_targets,
            s.teacher_targets,
            m.settings.capture.cross_tokenizer.as_ref().map_or(0, |c| c.matched_ids)
        ),
        None => println!("{}: already made with these settings ({rows} rows)", args.output.display()),
    }
    Ok(())
}
