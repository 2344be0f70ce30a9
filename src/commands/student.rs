//! `distill student init`: a student made from a teacher's layers or a narrower shape.
use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;

use distill::student::{init_student, LayerPick, StudentSpec};

#[derive(Args)]
pub struct StudentArgs {
    #[command(subcommand)]
    action: StudentAction,
}

#[derive(Subcommand)]
enum StudentAction {
    /// Make a student from a teacher: a subset of its layers (weights copied) and/or a
    /// narrower shape (fresh weights), with the teacher's tokenizer and chat template.
    Init(InitArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum PickArg {
    Edges,
    Spread,
}

#[derive(Args)]
struct InitArgs {
    /// Teacher model directory (Hugging Face layout).
    #[arg(long)]
    teacher: PathBuf,
    /// Output directory for the student.
    #[arg(long)]
    output: PathBuf,
    /// Teacher layers to keep, comma-separated (e.g. 0,2,4).
    #[arg(long, value_delimiter = ',', conflicts_with = "num_layers")]
    layers: Option<Vec<usize>>,
    /// Keep this many teacher layers, chosen by --pick.
    #[arg(long)]
    num_layers: Option<usize>,
    /// edges: the first 40% and last 60% of layers (drops a middle block; measured best);
    /// spread: evenly spread, first and last included.
    #[arg(long, value_enum, default_value = "edges")]
    pick: PickArg,
    /// Narrower width: fresh weights for every tensor.
    #[arg(long)]
    hidden_size: Option<usize>,
    #[arg(long)]
    intermediate_size: Option<usize>,
    #[arg(long)]
    num_heads: Option<usize>,
    #[arg(long)]
    num_kv_heads: Option<usize>,
    /// A mixture-of-experts teacher: keep this many experts per layer, those its router
    /// chooses most often on the tokens of --expert-sample.
    #[arg(long)]
    num_experts: Option<usize>,
    /// Dataset files (text, prompt/response or chat rows) for --num-experts.
    #[arg(long, num_args = 1.., requires = "num_experts")]
    expert_sample: Vec<String>,
    /// Seed of fresh weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace the model already in --output (a directory holding a model alone).
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: StudentArgs) -> Result<()> {
    let StudentAction::Init(a) = args.action;
    let spec = StudentSpec {
        layers: a.layers,
        num_layers: a.num_layers,
        pick: match a.pick {
            PickArg::Edges => LayerPick::Edges,
            PickArg::Spread => LayerPick::Spread,
        },
        hidden_size: a.hidden_size,
        intermediate_size: a.intermediate_size,
        num_heads: a.num_heads,
        num_kv_heads: a.num_kv_heads,
        num_experts: a.num_experts,
        expert_sample: a.expert_sample,
        seed: a.seed,
        overwrite: a.overwrite,
    };
    let s = init_student(&a.teacher, &a.output, &spec)?;
    println!("student written to {}", a.output.display());
    println!("  teacher layers kept  {:?}", s.layers);
    for (layer, kept) in s.layers.iter().zip(&s.experts) {
        if let Some(kept) = kept {
            let shown: Vec<String> = kept.iter().map(|(e, n)| format!("{e} ({n})")).collect();
            println!("  layer {layer} experts kept (router choices on the sample): {}", shown.join(", "));
        }
    }
    println!("  weights              {}", if s.copied { "copied from the teacher" } else { "fresh (new shape)" });
    println!(
        "  parameters           {:.1}M ({:.0}% of the teacher's {:.1}M)",
        s.parameters as f64 / 1e6,
        100.0 * s.parameters as f64 / s.teacher_parameters as f64,
        s.teacher_parameters as f64 / 1e6
    );
    Ok(())
}
