//! A teacher's shard set moved to a student's tokenizer (`train --cross-tokenizer`): an
//! ordinary shard set in the student's tokens and vocabulary (format version 2, with the
//! `uld_logprobs` and `group_continues` columns), built once and reused while its
//! settings match. Rows with no aligned target are left out.
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::targets::{matched_ids, ConvertStats, RowConverter};
use super::token_bytes::TokenBytes;
use super::Aligner;
use crate::files::checksum_file;
use crate::shards::dir::{create_staged, existing_set};
use crate::shards::manifest::{settings_diff, CrossTokenizerInfo, Manifest, Settings, TokenizerInfo};
use crate::shards::reader::ShardSet;
use crate::shards::row::ShardRow;
use crate::shards::schema::IdType;
use crate::shards::writer::RollingShards;
use crate::tokenizer::TextTokenizer;

pub const RULE: &str = "teacher and student tokens aligned by bytes into the smallest groups over the same text; \
     ULD targets per group: the teacher's top-k at the group's first token times the label probabilities of the rest, \
     and the remaining mass, sorted; hybrid KL on 1:1 groups over teacher ids whose strings the student's vocabulary holds";

pub struct CrossTokenizerSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// None when an existing set was reused.
    pub stats: Option<ConvertStats>,
}

/// Writes (or reuses) the student-side set of `teacher_set` in `output`.
/// `teacher_tokenizer`: the directory with the tokenizer the shards were made with
/// (default: the teacher's path in the manifest); its hash must match the manifest's.
pub fn student_targets(
    teacher_set: &Path,
    teacher_tokenizer: Option<&Path>,
    student_dir: &Path,
    output: &Path,
) -> Result<CrossTokenizerSet> {
    let set = ShardSet::open(teacher_set, false)?;
    let s = &set.manifest.settings;
    let tok_dir = teacher_tokenizer.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(&s.teacher.path));
    let teacher_tok = TextTokenizer::from_dir(&tok_dir).context("the teacher's tokenizer (--teacher-tokenizer DIR)")?;
    if checksum_file(teacher_tok.path())? != s.tokenizer.hash {
        bail!(
            "{}: not the tokenizer the shards in {} were made with (hash {}); pass the teacher's with --teacher-tokenizer",
            teacher_tok.path().display(),
            teacher_set.display(),
            s.tokenizer.hash
        );
    }
    let student_tok = TextTokenizer::from_dir(student_dir)?;
    let student_hash = checksum_file(student_tok.path())?;
    if student_hash == s.tokenizer.hash {
        bail!(
            "{}: the student has the teacher's tokenizer; train on the shards without --cross-tokenizer",
            student_dir.display()
        );
    }
    let (teacher_bytes, student_bytes) = (TokenBytes::new(&teacher_tok)?, TokenBytes::new(&student_tok)?);
    let matched = matched_ids(&teacher_bytes, &student_bytes);
    let vocab = student_tok.max_id() as usize + 1;
    let mut settings: Settings = s.clone();
    settings.tokenizer = TokenizerInfo { hash: student_hash, vocab_size: vocab, chat_template_hash: None };
    let c = &mut settings.capture;
    c.top_p = None;
    c.id_type = IdType::for_vocab(vocab);
    c.draws = None;
    c.hidden_layers.clear();
    c.sampler_logprobs = false;
    c.tail = "log of the teacher's mass outside the listed (matched) ids".into();
    c.cross_tokenizer = Some(CrossTokenizerInfo {
        teacher_set: teacher_set.display().to_string(),
        teacher_set_hash: set.manifest.shards_hash(),
        teacher_tokenizer: s.tokenizer.clone(),
        matched_ids: matched.len(),
        rule: RULE.into(),
    });
    if existing_set(output)?.is_some() {
        let existing = Manifest::load(output)?;
        let diff = settings_diff(&settings, &existing.settings);
        if existing.complete && diff.is_empty() {
            return Ok(CrossTokenizerSet { dir: output.to_path_buf(), manifest: existing, stats: None });
        }
        let why = if diff.is_empty() { vec!["complete: false (not written by this command)".into()] } else { diff };
        bail!(
            "{} holds student-side targets made otherwise:\n  {}\nremove it or choose another output",
            output.display(),
            why.join("\n  ")
        );
    }
    if c.top_k == 0 {
        bail!(
            "{}: the set holds no top-k (draws only); cross-tokenizer targets need the teacher's top-k",
            teacher_set.display()
        );
    }
    let converter = RowConverter {
        aligner: Aligner::new(&teacher_bytes, &student_bytes, &student_tok),
        matched: &matched,
        top_k: c.top_k,
    };
    let out = create_staged(output)?;
    let mut manifest = Manifest::new(settings.clone(), set.manifest.slices[0], 0, set.manifest.skipped.clone());
    manifest.slices = set.manifest.slices.clone();
    manifest.source_examples = set.manifest.source_examples.clone();
    let limits = settings.row_limits();
    let mut shards = RollingShards::new(&out.dir, &settings)?;
    let mut stats = ConvertStats::default();
    for &rg in set.row_groups() {
        let converted: Vec<(ShardRow, ConvertStats)> = set
            .decode(rg)?
            .par_iter()
            .map(|row| {
                let (r, s) = converter.convert(row).with_context(|| format!("row_index {}", row.sequence.row_index))?;
                r.check(&limits).with_context(|| format!("row_index {}: converted row", row.sequence.row_index))?;
                Ok((r, s))
            })
            .collect::<Result<_>>()?;
        let mut rows = vec![];
        for (r, s) in converted {
            stats.add(s);
            if r.num_targets() > 0 {
                rows.push(r);
            }
        }
        shards.write(&rows, &mut manifest)?;
    }
    shards.finish(&mut manifest)?;
    out.finish()?;
    Ok(CrossTokenizerSet { dir: output.to_path_buf(), manifest, stats: Some(stats) })
}
