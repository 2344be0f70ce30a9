//! `distill generate`: continuations of dataset rows by a model, as JSONL rows that
//! `precompute` and `train` read back (teacher-written answers for sequence-level KD).
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use distill::chat::ChatTemplate;
use distill::dataset::read::{read_raw_rows, resolve_inputs};
use distill::dataset::{FieldNames, TokenIdFields};
use distill::eval::text::check_tokenizer_fits;
use distill::generate::prompts::{output_row, prompt_rows};
use distill::generate::{generate, stop_ids_of, GenerateOptions, Hooks, Observer, SamplingOptions, StepView};
use distill::model::{parse_kind, CausalLm, ModelConfig};
use distill::precompute::capture::{CaptureSettings, DrawSettings};
use distill::precompute::replies::ReplyTargets;
use distill::precompute::PrecomputeConfig;
use distill::runtime::parse_device;
use distill::shards::dir::existing_set;
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// Continue dataset rows with a model: {"messages"} through the chat template and its
/// generation prompt, {"prompt"}, or {"text"}; greedy or sampled, with a key/value cache.
#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// JSONL or Parquet files, directories or globs.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// The JSONL file to write (refused if it exists, unless --overwrite).
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0: greedy; else sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens up to this mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// The same seed gives the same samples, whatever the batch or device.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replies per row (sampling; each written as its own row with `sample`).
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// A reply also ends where one of these strings appears (cut before it).
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Upper bound on batch * (longest prompt + max new tokens).
    #[arg(long, default_value_t = 16384)]
    batch_tokens: usize,
    /// Upper bound on the rows of a batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Also write the token ids of the prompt (`prompt_ids`) and of the reply
    /// (`response_ids`, every generated token, also past a --stop string) and the
    /// model's log-probability of each reply token at temperature 1
    /// (`response_logprobs`): `precompute --token-ids` reads them back exactly.
    #[arg(long)]
    with_ids: bool,
    /// Sequence-level KD in one pass: also write the model's targets for its replies
    /// (the logits each token was chosen from) as a shard set in this directory, the set
    /// `precompute --token-ids` would write over the --output rows (implies --with-ids).
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Captured targets: top-k ids per reply token (as precompute --top-k).
    #[arg(long, default_value_t = 16)]
    target_top_k: usize,
    /// Captured targets: ids drawn from the tail per reply token (as precompute --sample).
    #[arg(long, default_value_t = 16)]
    target_sample: usize,
    #[arg(long, default_value_t = 0)]
    target_seed: u64,
    /// Captured targets: hidden states to keep (as precompute --hidden-layers).
    #[arg(long, value_delimiter = ',')]
    hidden_layers: Vec<usize>,
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long, default_value = "prompt")]
    prompt_field: String,
    #[arg(long, default_value = "response")]
    response_field: String,
    #[arg(long, default_value = "messages")]
    messages_field: String,
    #[arg(long)]
    no_progress: bool,
    /// For the tests only: abort like `kill -9` while writing the captured set, after
    /// this many complete shards.
    #[arg(long, hide = true)]
    crash_after_shards: Option<usize>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_options(&args)?;
    let fields = FieldNames {
        text: args.text_field.clone(),
        prompt: args.prompt_field.clone(),
        response: args.response_field.clone(),
        messages: args.messages_field.clone(),
        token_ids: None,
    };
    let capture = match &args.capture {
        Some(dir) => Some(capture_config(&args, dir)?),
        None => None,
    };
    let with_ids = args.with_ids || capture.is_some();
    let tokenizer = check_tokenizer_fits(&args.model)?;
    let template = ChatTemplate::load(&args.model)?;
    let rows = prompt_rows(read_raw_rows(&resolve_inputs(&args.input)?)?, &fields, &tokenizer, template.as_ref())?;
    let config = ModelConfig::from_file(&distill::model::config_path_of(&args.model))?;
    for r in &rows {
        config
            .check_length(r.ids.len() + 1)
            .with_context(|| format!("{}: the prompt ({} tokens) and its first new token", r.location, r.ids.len()))?;
    }
    let model = CausalLm::load(&args.model, parse_device(&args.device)?, parse_kind(&args.dtype)?)?;
    let n = args.num_samples;
    let prompts: Vec<Vec<u32>> = rows.iter().flat_map(|r| std::iter::repeat_n(r.ids.clone(), n)).collect();
    let keys: Vec<u64> = (0..prompts.len() as u64).collect();
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        stop_ids: stop_ids_of(&args.model)?,
        sampling: SamplingOptions {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        max_batch_tokens: args.batch_tokens,
        max_batch_rows: args.max_batch,
    };
    let bar = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} {human_pos} tokens  {per_sec}").expect("valid"),
        );
        bar
    };
    // Stop strings: look at the last few tokens only (each token is at least one character).
    let longest_stop = args.stop.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    let stop_hook = |_: usize, ids: &[u32]| {
        let tail = &ids[ids.len().saturating_sub(longest_stop + 4)..];
        tokenizer.decode(tail, true).is_ok_and(|text| args.stop.iter().any(|s| text.contains(s.as_str())))
    };
    let progress = |count: usize| bar.inc(count as u64);
    let recorder = capture.as_ref().map(|cfg| {
        let settings = CaptureSettings {
            top_k: cfg.top_k,
            top_p: None,
            min_k: 0,
            audit_temperatures: vec![],
            draws: (cfg.sample > 0).then_some(DrawSettings { per_position: cfg.sample, seed: cfg.sample_seed }),
            hidden_layers: cfg.hidden_layers.clone(),
            vocab_limit: tokenizer.max_id() as usize + 1,
        };
        ReplyTargets::new(settings, prompts.len())
    });
    if let Some(r) = &recorder {
        r.settings().check(&model)?;
    }
    let logprobs: RefCell<Vec<Vec<f32>>> = RefCell::new(vec![vec![]; prompts.len()]);
    let on_step = |step: &StepView| -> Result<()> {
        let picked = Tensor::from_slice(&step.tokens.iter().map(|&t| t as i64).collect::<Vec<_>>());
        let picked = step.logits.gather(-1, &picked.to_device(step.logits.device()).unsqueeze(-1), false);
        let chosen = (picked - step.logits.logsumexp([-1], true)).to_kind(Kind::Float);
        let chosen = Vec::<f32>::try_from(chosen.reshape([-1]).to_device(tch::Device::Cpu))?;
        let mut all = logprobs.borrow_mut();
        for (&i, lp) in step.prompts.iter().zip(chosen) {
            all[i].push(lp);
        }
        match &recorder {
            Some(r) => r.record(step.prompts, step.numbers, step.logits, step.tokens, step.hidden),
            None => Ok(()),
        }
    };
    let hidden_layers = capture.as_ref().map(|c| c.hidden_layers.clone()).unwrap_or_default();
    let hooks = Hooks {
        stop: (!args.stop.is_empty()).then_some(&stop_hook as _),
        progress: Some(&progress),
        observer: with_ids.then_some(Observer { hidden_layers: &hidden_layers, on_step: &on_step }),
    };
    let started = Instant::now();
    let replies = generate(&model, &prompts, &keys, &opts, &hooks)?;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    // The replies go to a temporary file first; --output is replaced only once they and
    // the captured targets are complete, so a failure keeps the old pair as it was.
    // (Its name ends in .jsonl: the capture reads it back.)
    let tmp = args.output.with_extension("tmp-distill.jsonl");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let mut new_tokens = 0;
    for (i, reply) in replies.iter().enumerate() {
        let row = &rows[i / n];
        let mut text = tokenizer.decode(&reply.ids, true)?;
        if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        let mut extra = Map::new();
        extra.insert("finish_reason".into(), json!(reply.finish));
        extra.insert("new_tokens".into(), json!(reply.ids.len()));
        if n > 1 {
            extra.insert("sample".into(), json!(i % n));
        }
        if with_ids {
            extra.insert("prompt_ids".into(), json!(row.ids));
            extra.insert("response_ids".into(), json!(reply.ids));
            extra.insert("response_logprobs".into(), json!(logprobs.borrow()[i]));
            extra.insert("ids_tokenizer".into(), json!(tokenizer.vocab_fingerprint()));
        }
        new_tokens += reply.ids.len();
        serde_json::to_writer(&mut out, &output_row(row, &fields, &text, extra))?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    eprintln!(
        "generated {new_tokens} tokens for {} rows ({} replies) in {elapsed:.2}s ({:.1} tokens/s)",
        rows.len(),
        replies.len(),
        new_tokens as f64 / elapsed.max(1e-9),
    );
    if let (Some(recorder), Some(cfg)) = (recorder, capture) {
        // The set is made from the rows as written (the temporary file), and records
        // --output as its source: the name they have once moved into place.
        let summary = recorder
            .write(&PrecomputeConfig { inputs: vec![tmp.display().to_string()], ..cfg.clone() }, &args.output)?;
        eprintln!(
            "captured the targets of {} reply tokens in {} shards ({:.1} bytes/token) -> {}",
            summary.targets,
            summary.shards,
            summary.bytes_per_token(),
            cfg.output.display()
        );
    }
    std::fs::rename(&tmp, &args.output).with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!("replies -> {}", args.output.display());
    Ok(())
}

/// Every option checked before the model is loaded: a mistake must not cost the whole
/// generation.
fn check_options(args: &GenerateArgs) -> Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 asks for no reply; give at least 1");
    }
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature {} must be a number, 0 (greedy) or more", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {} must lie in (0, 1]", args.top_p);
    }
    if args.num_samples > 1 && args.temperature == 0.0 {
        bail!(
            "--num-samples {} with greedy decoding gives the same reply each time; set --temperature",
            args.num_samples
        );
    }
    if let Some(i) = args.stop.iter().position(String::is_empty) {
        bail!("--stop number {}: an empty string would end every reply before its first token", i + 1);
    }
    // Rows are JSON lines, and precompute and train read a file by its extension.
    if args.output.extension().is_none_or(|e| e != "jsonl") {
        bail!("--output {}: the replies are JSON lines; give a file name ending in .jsonl", args.output.display());
    }
    if args.output.exists() && !args.overwrite {
        bail!("{} exists; choose another --output or pass --overwrite", args.output.display());
    }
    let folder = args.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !folder.is_dir() {
        bail!("--output {}: the folder {} does not exist", args.output.display(), folder.display());
    }
    if args.output.is_dir() {
        bail!("--output {} is a directory; give a .jsonl file", args.output.display());
    }
    if args.output.exists() {
        let out = std::fs::canonicalize(&args.output)?;
        for input in resolve_inputs(&args.input)? {
            if std::fs::canonicalize(&input).is_ok_and(|i| i == out) {
                bail!(
                    "--output {} is also an --input: the rows being read would be replaced; write the replies elsewhere",
                    args.output.display()
                );
            }
        }
    }
    stop_ids_of(&args.model)?;
    Ok(())
}

/// The precompute run whose shard set `--capture` writes: `precompute --token-ids` over
/// the --output rows with the model as teacher. Checked before any decoding.
fn capture_config(args: &GenerateArgs, dir: &std::path::Path) -> Result<PrecomputeConfig> {
    let model_config = ModelConfig::from_file(&distill::model::config_path_of(&args.model))?;
    let longest = model_config.max_position_embeddings.unwrap_or(usize::MAX);
    let defaults = PrecomputeConfig::default();
    let cfg = PrecomputeConfig {
        teacher: args.model.clone(),
        inputs: vec![args.output.display().to_string()],
        output: dir.to_path_buf(),
        fields: FieldNames { token_ids: Some(TokenIdFields::default()), ..FieldNames::default() },
        // Every reply fits: prompt + reply never pass the context.
        max_len: longest.min(1 << 20),
        pack: false,
        top_k: args.target_top_k,
        top_p: None,
        min_k: 0,
        sample: args.target_sample,
        sample_seed: args.target_seed,
        hidden_layers: args.hidden_layers.clone(),
        devices: vec![vec![parse_device(&args.device)?]],
        dtype: Some(parse_kind(&args.dtype)?),
        overwrite: args.overwrite,
        progress: false,
        crash_after_shards: args.crash_after_shards,
        ..defaults
    };
    cfg.validate()?;
    // Checked before decoding (the shard set is written after it): a directory that is
    // not a shard set is refused untouched; a complete set is replaced only with
    // --overwrite; an incomplete one (an interrupted run) is resumed when its settings
    // are this run's, which `OutputPlan` checks against the rows once they exist.
    let existing = existing_set(dir).with_context(|| format!("--capture {}", dir.display()))?;
    if existing.is_some_and(|m| m.complete) && !args.overwrite {
        bail!(
            "--capture {}: a shard set is already there; choose another directory or pass --overwrite",
            dir.display()
        );
    }
    Ok(cfg)
}
