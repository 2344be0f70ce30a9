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

#[derive(Args)]
pub struct MergeTeachersArgs {
    /// Output directory for the mixed shard set (absent or empty).
    #[arg(long)]
    output: PathBuf,
    /// Ids kept per position, from the union of the teachers' lists (default: the
    /// largest top-k of the inputs).
    #[arg(long)]
    top_k: Option<usize>,
    /// Weights for the documents of one data file: `FILE=W1,W2,...`, one weight per
    /// teacher in the order given (FILE: its path in the manifest or its file name).
    /// Repeat for several files; other files take the SET:WEIGHT weights.
    #[arg(long = "source-weights", value_name = "FILE=W1,W2,...")]
    source_weights: Vec<String>,
    /// Route each document to one teacher by a field of its data row: `FIELD=NAME_A,NAME_B`
    /// (one name per set, in order); a row whose FIELD is NAME_A takes set A's targets
    /// alone. Rows without the field take --source-weights or the global weights.
    #[arg(long, value_name = "FIELD=NAME1,NAME2,...")]
    route: Option<String>,
    /// Carry the hidden-state columns of this teacher (0 = the first set given).
    #[arg(long)]
    hidden_from: Option<usize>,
    /// Each teacher's shard set with its weight, `DIR:WEIGHT` (weight 1 when left out;
    /// weights are scaled to sum to 1). All made with the same tokenizer over the same data.
    #[arg(required = true, value_name = "DIR[:WEIGHT]")]
    sets: Vec<String>,
}

pub fn run_teachers(args: MergeTeachersArgs) -> Result<()> {
    use anyhow::Context;
    use distill::shards::teachers::{merge_teachers, MixOptions, Route, TeacherSet};
    let sets: Vec<TeacherSet> = args
        .sets
        .iter()
        .map(|s| match s.rsplit_once(':').and_then(|(d, w)| Some((d, w.parse::<f64>().ok()?))) {
            Some((dir, weight)) => TeacherSet { dir: dir.into(), weight },
            None => TeacherSet { dir: s.into(), weight: 1.0 },
        })
        .collect();
    let source_weights = args
        .source_weights
        .iter()
        .map(|s| {
            let (file, weights) =
                s.rsplit_once('=').with_context(|| format!("--source-weights {s}: expected FILE=W1,W2,..."))?;
            let weights = weights
                .split(',')
                .map(|w| {
                    w.trim().parse::<f64>().with_context(|| format!("--source-weights {s}: {w:?} is not a number"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((file.to_string(), weights))
        })
        .collect::<Result<Vec<_>>>()?;
    let route = match &args.route {
        Some(r) => {
            let (field, names) =
                r.split_once('=').with_context(|| format!("--route {r}: expected FIELD=NAME1,NAME2,..."))?;
            Some(Route { field: field.trim().into(), names: names.split(',').map(|n| n.trim().to_string()).collect() })
        }
        None => None,
    };
    let opts = MixOptions { top_k: args.top_k, source_weights, hidden_from: args.hidden_from, route };
    let m = merge_teachers(&sets, &opts, &args.output)?;
    let mixture = m.settings.mixture.as_ref().expect("a merged set records its mixture");
    println!(
        "mixed {} teachers into {}: {} shards, {} tokens, top-{}",
        mixture.teachers.len(),
        args.output.display(),
        m.shards.len(),
        m.total_tokens(),
        m.settings.capture.top_k
    );
    for t in &mixture.teachers {
        println!("  {:.4}  {} ({})", t.weight, t.set, t.teacher.path);
    }
    for sw in &mixture.source_weights {
        let w: Vec<String> = sw.weights.iter().map(|w| format!("{w:.4}")).collect();
        println!("  documents of {}: {}", sw.source, w.join(", "));
    }
    if let Some(r) = &mixture.route {
        println!("  {}", r.describe());
    }
    Ok(())
}
