//! Before the teacher runs: read and slice the data, tokenise it, describe the run
//! (`Settings`), and cut the rows into shards and batches. All of it is deterministic,
//! so a resumed run plans exactly the shards of the interrupted one.
use anyhow::{bail, Result};
use std::ops::Range;

use super::PrecomputeConfig;
use crate::chat::ChatTemplate;
use crate::dataset::read::{hash_inputs, read_records, resolve_inputs};
use crate::dataset::sequence::{build_sequences, Sequence, SequenceOptions};
use crate::files::checksum_file;
use crate::model::{kind_name, ModelConfig};
use crate::shards::manifest::{
    CaptureInfo, DataInfo, DrawInfo, Settings, ShardingInfo, SkipReport, SourceFile, TeacherInfo, TokenizerInfo,
};
use crate::shards::schema::{IdType, ShardLayout};
use crate::tokenizer::TextTokenizer;

/// The data and description of one run, ready for the teacher.
pub struct Prepared {
    pub settings: Settings,
    pub layout: ShardLayout,
    pub rows: Vec<Sequence>,
    pub skipped: SkipReport,
    pub teacher_config: ModelConfig,
    /// Examples read from each input file (see `Manifest::source_examples`).
    pub source_examples: Vec<u64>,
}

pub fn prepare(cfg: &PrecomputeConfig) -> Result<Prepared> {
    let config_path = crate::model::config_path_of(&cfg.teacher);
    let teacher_config = ModelConfig::from_file(&config_path)?;
    let tokenizer = TextTokenizer::from_dir(&cfg.teacher)?;
    tokenizer.check_fits(&teacher_config, &config_path)?;
    let template = ChatTemplate::load(&cfg.teacher)?;
    let n_layers = teacher_config.num_layers;
    if let Some(&bad) = cfg.hidden_layers.iter().find(|&&l| l > n_layers) {
        bail!("--hidden-layers: layer {bad} does not exist (the teacher has {n_layers} layers; valid: 0..={n_layers})");
    }
    let vocab = tokenizer.max_id() as usize + 1;
    if cfg.top_k > vocab {
        bail!("--top-k {} must be at most the vocabulary size {vocab}", cfg.top_k);
    }
    if cfg.sample > 0 && cfg.top_k >= vocab {
        bail!("--top-k {} covers the whole vocabulary: no tail is left to draw from; add --sample 0", cfg.top_k);
    }
    let (slice_index, slice_count) = (cfg.slice.index, cfg.slice.count);

    let files = resolve_inputs(&cfg.inputs)?;
    let data_hash = hash_inputs(&files)?;
    let (records, invalid) = read_records(&files, &cfg.fields, cfg.skip_invalid)?;
    let n = records.len();
    let range = slice_range(n, slice_index, slice_count);
    let seq_opts = SequenceOptions {
        max_len: cfg.max_len,
        pack: cfg.pack,
        skip_invalid: cfg.skip_invalid,
        train_on_all_tokens: cfg.train_on_all_tokens,
    };
    let (rows, stats) =
        build_sequences(&records[range.clone()], range.start as u64, &tokenizer, template.as_ref(), &seq_opts)?;
    // The teacher reads each document from position 0 (a packed row restarts them), so
    // each must fit its context: the rule `generate` and `score` follow too.
    for row in &rows {
        for (id, &len) in row.sample_ids.iter().zip(&row.doc_lengths) {
            if let Err(e) = teacher_config.check_length(len as usize) {
                let at = records.iter().find(|r| &r.id == id).map_or(id.clone(), |r| r.location.clone());
                let context = teacher_config.max_position_embeddings.unwrap_or_default();
                bail!("{at}: {e:#}; give --max-len {context} or less");
            }
        }
    }
    let mut all_invalid = invalid;
    all_invalid.extend(stats.invalid);
    let skipped = SkipReport {
        invalid_rows: all_invalid.len(),
        examples: all_invalid.iter().take(20).map(|r| (r.location.clone(), r.error.clone())).collect(),
        truncated_examples: stats.truncated,
        truncated_tokens: stats.truncated_tokens,
    };

    // Sampled rows carry their sampler's log-probabilities (fixed rows mixed in: null).
    let sampler_logprobs = rows.iter().any(|r| r.sampler_logprobs.is_some());
    if let Some(f) = &cfg.fields.token_ids {
        if !records.iter().any(|r| matches!(r.example, crate::dataset::Example::Tokens { .. })) {
            bail!(
                "--token-ids: no input row has the fields `{}` and `{}` (write them with `distill generate --with-ids`)",
                f.prompt,
                f.response
            );
        }
    }
    let id_type = IdType::for_vocab(vocab);
    let layout = ShardLayout {
        top_k: cfg.top_k,
        draws: cfg.sample > 0,
        adaptive: cfg.top_p.is_some(),
        sampler_logprobs,
        id_type,
        hidden: cfg.hidden_layers.iter().map(|&l| (l, teacher_config.hidden_size)).collect(),
        uld: false,
    };
    let settings = Settings {
        teacher: TeacherInfo {
            path: cfg.teacher.display().to_string(),
            config_hash: checksum_file(&config_path)?,
            architecture: teacher_config.family.architecture().into(),
            num_layers: n_layers,
            hidden_size: teacher_config.hidden_size,
            model_vocab_size: teacher_config.vocab_size,
            dtype: kind_name(cfg.teacher_dtype()).into(),
        },
        tokenizer: TokenizerInfo {
            hash: checksum_file(tokenizer.path())?,
            vocab_size: vocab,
            chat_template_hash: template.as_ref().map(|t| checksum_file(t.origin())).transpose()?,
        },
        capture: CaptureInfo {
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            min_k: cfg.min_k,
            id_type,
            logprob_dtype: "float16".into(),
            tail: "log of the probability mass outside the top-k (float32, -inf when none)".into(),
            hidden_layers: cfg.hidden_layers.clone(),
            hidden_dtype: "float16 values divided by their per-position RMS; RMS in float32".into(),
            draws: (cfg.sample > 0).then(|| DrawInfo {
                per_position: cfg.sample,
                seed: cfg.sample_seed,
                from: "the teacher's distribution at temperature 1 renormalised over the ids outside the top-k".into(),
            }),
            sampler_logprobs,
            cross_tokenizer: None,
            served: None,
        },
        data: DataInfo {
            sources: files
                .iter()
                .map(|f| Ok(SourceFile { path: f.display().to_string(), bytes: std::fs::metadata(f)?.len() }))
                .collect::<Result<_>>()?,
            hash: data_hash,
            fields: cfg.fields.recorded(),
            max_len: cfg.max_len,
            packing: cfg.pack,
            train_on_all_tokens: cfg.train_on_all_tokens,
            skip_invalid: cfg.skip_invalid,
        },
        sharding: ShardingInfo {
            shard_tokens: cfg.shard_tokens,
            zstd_level: cfg.parquet.zstd_level,
            row_group_rows: cfg.parquet.row_group_rows,
            byte_stream_split: cfg.parquet.byte_stream_split,
        },
        mixture: None,
    };
    // Records of each file (locations are `FILE:LINE`), so that a row's `row_index`
    // tells which file its examples came from.
    let source_examples = files
        .iter()
        .map(|f| {
            let path = f.display().to_string();
            records.iter().filter(|r| r.location.rsplit_once(':').is_some_and(|(p, _)| p == path)).count() as u64
        })
        .collect();
    Ok(Prepared { settings, layout, rows, skipped, teacher_config, source_examples })
}

/// Rows `[index * n / count, (index + 1) * n / count)`: contiguous, disjoint, covering.
pub fn slice_range(n: usize, index: usize, count: usize) -> Range<usize> {
    (index * n / count)..((index + 1) * n / count)
}

/// Consecutive rows grouped into shards of at least `shard_tokens` tokens (the last
/// may be smaller).
pub fn plan_shards(rows: &[Sequence], shard_tokens: usize) -> Vec<Range<usize>> {
    let mut shards = vec![];
    let (mut start, mut tokens) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        tokens += row.len();
        if tokens >= shard_tokens {
            shards.push(start..i + 1);
            start = i + 1;
            tokens = 0;
        }
    }
    if start < rows.len() {
        shards.push(start..rows.len());
    }
    shards
}

/// The rows of one shard in batches of at most `batch_tokens` padded tokens, longest
/// first, so rows of similar length share a batch and little is padding.
pub fn plan_batches(rows: &[Sequence], shard: Range<usize>, batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = shard.collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(rows[i].len()), i));
    let mut batches: Vec<Vec<usize>> = vec![];
    for i in order {
        match batches.last_mut() {
            // Sorted longest first, so the batch's first row sets its padded width.
            Some(b) if (b.len() + 1) * rows[b[0]].len() <= batch_tokens => b.push(i),
            _ => batches.push(vec![i]),
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(lens: &[usize]) -> Vec<Sequence> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| Sequence {
                row_index: i as u64,
                sample_ids: vec![i.to_string()],
                doc_lengths: vec![n as u32],
                ids: vec![1; n],
                loss_mask: vec![true; n],
                sampler_logprobs: None,
            })
            .collect()
    }

    #[test]
    fn slices_cover_every_row_once() {
        let n = 103;
        let mut seen = vec![];
        for i in 0..7 {
            seen.extend(slice_range(n, i, 7));
        }
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn shards_and_batches() {
        let r = rows(&[5, 9, 3, 8, 2, 7]);
        assert_eq!(plan_shards(&r, 10), vec![0..2, 2..4, 4..6]);
        let batches = plan_batches(&r, 0..6, 18);
        assert_eq!(batches, vec![vec![1, 3], vec![5, 0], vec![2, 4]]);
        for b in &batches {
            assert!(b.len() * r[b[0]].len() <= 18);
        }
    }
}
