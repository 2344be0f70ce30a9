//! `manifest.json` of a shard set: what produced it (settings that a resumed or merged
//! run must share), the list of complete shards with counts and checksums, and what
//! was skipped. Rewritten atomically (temp file + rename) after each complete shard,
//! so a crash never lists a partial one.
use super::audit::{AuditSummary, AuditSums};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

use super::row::RowLimits;
use super::schema::{IdType, ShardLayout, FORMAT_NAME, READABLE_VERSIONS};
use crate::files::{checksum_bytes, write_atomic};

pub const MANIFEST_FILE: &str = "manifest.json";

/// Everything that determines the shards' contents. Two runs with equal settings write
/// identical shards; resume and merge require equality and name any difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub teacher: TeacherInfo,
    pub tokenizer: TokenizerInfo,
    pub capture: CaptureInfo,
    pub data: DataInfo,
    pub sharding: ShardingInfo,
    /// A set merged from several teachers' sets (`distill merge-teachers`): who they
    /// are and how their distributions were mixed. Absent for one teacher's set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixture: Option<MixtureInfo>,
}

impl Settings {
    /// The columns these settings give a shard.
    pub fn layout(&self) -> ShardLayout {
        let c = &self.capture;
        ShardLayout {
            top_k: c.top_k,
            draws: c.draws.is_some(),
            adaptive: c.top_p.is_some() || c.cross_tokenizer.is_some(),
            sampler_logprobs: c.sampler_logprobs,
            uld: c.cross_tokenizer.is_some(),
            id_type: c.id_type,
            hidden: c.hidden_layers.iter().map(|&l| (l, self.teacher.hidden_size)).collect(),
        }
    }

    /// What every row must agree with.
    pub fn row_limits(&self) -> RowLimits {
        RowLimits {
            top_k: self.capture.top_k,
            vocab: self.tokenizer.vocab_size,
            hidden: self.layout().hidden,
            draws: self.capture.draws.as_ref().map_or(0, |d| d.per_position),
            adaptive: self.capture.top_p.is_some() || self.capture.cross_tokenizer.is_some(),
            cross: self.capture.cross_tokenizer.is_some(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub path: String,
    /// xxh3 of config.json's bytes.
    pub config_hash: String,
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    /// Rows of the embedding table (may exceed the tokenizer's vocabulary).
    pub model_vocab_size: usize,
    pub dtype: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// xxh3 of tokenizer.json's bytes.
    pub hash: String,
    /// Ids the tokenizer can produce: the softmax runs over `0..vocab_size`.
    pub vocab_size: usize,
    pub chat_template_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureInfo {
    pub top_k: usize,
    /// Mass-adaptive top-k (format version 2): each position keeps the fewest of its
    /// top-k ids whose probabilities reach this mass; absent: k ids everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// With `top_p`: the fewest ids any position keeps (absent: 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_k: usize,
    pub id_type: IdType,
    pub logprob_dtype: String,
    /// What `tail_logmass` holds.
    pub tail: String,
    pub hidden_layers: Vec<usize>,
    pub hidden_dtype: String,
    /// Tail draws (format version 2); absent when the set holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draws: Option<DrawInfo>,
    /// The rows are samples of a model (on-policy rounds) and the `sampler_logprob`
    /// column holds its log-probability of each trained token (format version 2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampler_logprobs: bool,
    /// Targets moved to another tokenizer (`train --cross-tokenizer`): the rows are the
    /// student's tokens, `settings.tokenizer` the student's (format version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_tokenizer: Option<CrossTokenizerInfo>,
    /// Targets imported from a server's responses (`distill import-logprobs`), not
    /// computed by a teacher forward pass here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<ServedInfo>,
}

/// Where a served teacher's targets came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedInfo {
    pub responses: Vec<SourceFile>,
    /// The xxh3 of each response file, comma-separated.
    pub responses_hash: String,
    /// The response formats read (vLLM prompt_logprobs, OpenAI echo, SGLang).
    pub formats: Vec<String>,
    /// Over which ids the server's log-probs are normalised.
    pub normalised_over: String,
}

/// Where a cross-tokenizer set's targets came from and how they were moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossTokenizerInfo {
    /// The teacher's shard set and the xxh3 of its shard checksums.
    pub teacher_set: String,
    pub teacher_set_hash: String,
    pub teacher_tokenizer: TokenizerInfo,
    /// Teacher ids whose strings the student's vocabulary holds exactly.
    pub matched_ids: usize,
    pub rule: String,
}

/// How the `draw_ids` / `draw_counts` columns were drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrawInfo {
    /// Draws per position (the counts of each position sum to it).
    pub per_position: usize,
    /// Seed of the draws: position t of the row with `row_index` r uses the uniform
    /// numbers `draw_uniforms(seed, r, t)` (see `model::sampling`), whatever the batch.
    pub seed: u64,
    /// What they were drawn from: the teacher's distribution at temperature 1,
    /// renormalised over the ids outside the top-k.
    pub from: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub sources: Vec<SourceFile>,
    pub hash: String,
    pub fields: Json,
    pub max_len: usize,
    pub packing: bool,
    pub train_on_all_tokens: bool,
    pub skip_invalid: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardingInfo {
    /// Rows go to a new shard once a shard holds this many tokens.
    pub shard_tokens: usize,
    pub zstd_level: i32,
    pub row_group_rows: usize,
    pub byte_stream_split: bool,
}

/// How a merged set's targets were made from several teachers' sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureInfo {
    pub teachers: Vec<MixedTeacher>,
    /// Weights by data source (a domain expert per file), in the order of `teachers`;
    /// a document from a source not listed here takes each teacher's `weight`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_weights: Vec<SourceWeights>,
    /// Per-document routing by a data field (`merge-teachers --route`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteInfo>,
    /// How an id missing from a teacher's top-k is given a share of that teacher's tail.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedTeacher {
    /// The input shard set as given on the command line.
    pub set: String,
    /// xxh3 of the input set's shard checksums, in order: which targets were mixed.
    pub set_hash: String,
    pub teacher: TeacherInfo,
    pub tokenizer_hash: String,
    pub top_k: usize,
    /// Weight of this teacher's distribution (the weights sum to 1).
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceWeights {
    /// A path of `data.sources`.
    pub source: String,
    /// One weight per teacher, summing to 1.
    pub weights: Vec<f64>,
}

/// Routing by a data field: which value names which teacher, and how many examples each got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub field: String,
    /// One per teacher, in the order of `teachers`.
    pub names: Vec<String>,
    /// Examples of the data routed to each teacher.
    pub examples: Vec<usize>,
    /// Examples without the field (they take the source or global weights).
    pub unrouted: usize,
}

impl RouteInfo {
    pub fn describe(&self) -> String {
        let each: Vec<String> = self.names.iter().zip(&self.examples).map(|(n, c)| format!("{c} to {n}")).collect();
        format!("routed by `{}`: {} examples, {} without the field", self.field, each.join(", "), self.unrouted)
    }
}

/// Which part of the data this set covers: rows `[index * n / count, (index+1) * n / count)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub rows: usize,
    pub tokens: usize,
    pub targets: usize,
    pub bytes: u64,
    /// xxh3-64 of the whole file.
    pub checksum: String,
    /// First and one-past-last `row_index` in this shard.
    pub row_range: (u64, u64),
    /// What this shard's targets lose (`audit`); absent in sets made before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSums>,
}

impl ShardEntry {
    /// Maps `dir/{file}` after checking that it is the shard this entry lists: present,
    /// of the listed size, with the listed checksum. The one check every reader of a
    /// listed shard runs (training, resume, merge, inspect).
    pub fn open_verified(&self, dir: &Path) -> Result<memmap2::Mmap> {
        check_shard_name(&self.file).with_context(|| format!("{}", Manifest::path(dir).display()))?;
        let path = dir.join(&self.file);
        let file =
            std::fs::File::open(&path).with_context(|| format!("{}: listed shard is missing", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        if len != self.bytes {
            bail!(
                "{}: {len} bytes, the manifest says {}: the shard is truncated or replaced",
                path.display(),
                self.bytes
            );
        }
        // SAFETY: read-only mapping; shards are immutable once listed.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let checksum = checksum_bytes(&map);
        if checksum != self.checksum {
            bail!(
                "{}: checksum {checksum} does not match the manifest's {}; the shard is corrupt",
                path.display(),
                self.checksum
            );
        }
        Ok(map)
    }
}

/// A listed shard must be a plain `shard-NNNNN.parquet` in the set's own directory: a
/// manifest may come from anywhere, and a name like `../x` or `/etc/x` would make every
/// reader open a file outside the set.
pub fn check_shard_name(name: &str) -> Result<()> {
    let digits = name.strip_prefix("shard-").and_then(|n| n.strip_suffix(".parquet"));
    if !digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
        bail!("shard file name {name:?} is not of the form shard-NNNNN.parquet inside the set's directory");
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkipReport {
    pub invalid_rows: usize,
    /// The first invalid rows with their errors (file:line and message).
    pub examples: Vec<(String, String)>,
    pub truncated_examples: usize,
    pub truncated_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub distill_version: String,
    pub settings: Settings,
    pub slices: Vec<Slice>,
    pub planned_shards: usize,
    pub complete: bool,
    pub shards: Vec<ShardEntry>,
    pub skipped: SkipReport,
    /// Examples read from each file of `settings.data.sources`, in order: they fix which
    /// `row_index` values come from which file (per-source mixture weights). Empty in
    /// sets made before distill recorded it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_examples: Vec<u64>,
    /// The listed shards' audits summed (written by `save`, for people and Arrow-side
    /// tools; readers recompute it from the shards' entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSummary>,
}

impl Manifest {
    pub fn new(settings: Settings, slice: Slice, planned_shards: usize, skipped: SkipReport) -> Self {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: settings.layout().format_version(),
            distill_version: env!("CARGO_PKG_VERSION").into(),
            settings,
            slices: vec![slice],
            planned_shards,
            complete: false,
            shards: vec![],
            skipped,
            source_examples: vec![],
            audit: None,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads `dir/manifest.json`; the error says plainly when `dir` is not a shard set.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a distill shard set: cannot read {}", dir.display(), path.display()))?;
        let json: Json = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        if json.get("format").and_then(Json::as_str) != Some(FORMAT_NAME) {
            bail!("{}: not a distill shard manifest (field `format` is not {FORMAT_NAME:?})", path.display());
        }
        let version = json.get("format_version").and_then(Json::as_u64).unwrap_or(0);
        if !READABLE_VERSIONS.iter().any(|&v| u64::from(v) == version) {
            bail!(
                "{}: format_version {version} is not supported (this distill reads versions {READABLE_VERSIONS:?})",
                path.display()
            );
        }
        serde_json::from_value(json).with_context(|| format!("{}: malformed manifest", path.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let audit = self.audit_sums().map(|s| s.summary());
        let with_audit = Manifest { audit, ..self.clone() };
        write_atomic(&Self::path(dir), &serde_json::to_vec_pretty(&with_audit)?)
    }

    /// The listed shards' audits merged; `None` when no shard holds one.
    pub fn audit_sums(&self) -> Option<AuditSums> {
        let mut all: Option<AuditSums> = None;
        for a in self.shards.iter().filter_map(|s| s.audit.as_ref()) {
            all.get_or_insert_with(AuditSums::default).merge(a);
        }
        all
    }

    /// xxh3-64 of the listed shards' checksums joined by commas: which targets a set
    /// made from this one (a mixture, a cross-tokenizer set) was made from.
    pub fn shards_hash(&self) -> String {
        let listed: Vec<&str> = self.shards.iter().map(|e| e.checksum.as_str()).collect();
        checksum_bytes(listed.join(",").as_bytes())
    }

    pub fn total_tokens(&self) -> usize {
        self.shards.iter().map(|s| s.tokens).sum()
    }
}

/// Names the first fields where `ours` and `theirs` differ, as dotted paths.
/// A field that differs is named with the option that sets it, where one does.
pub fn settings_diff(ours: &Settings, theirs: &Settings) -> Vec<String> {
    let lines = json_diff(&serde_json::to_value(ours).unwrap(), &serde_json::to_value(theirs).unwrap());
    lines
        .into_iter()
        .map(|line| {
            let path = line.split(':').next().unwrap_or_default();
            let option = SETTING_OPTIONS.iter().find(|(prefix, _)| {
                path == *prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with(['.', '[']))
            });
            match option {
                Some((_, option)) => line.replacen(':', &format!(" ({option}):"), 1),
                None => line,
            }
        })
        .collect()
}

/// The options of `precompute` (and the commands that write sets like it) behind each
/// recorded setting.
const SETTING_OPTIONS: &[(&str, &str)] = &[
    ("teacher.path", "--teacher"),
    ("teacher.dtype", "--dtype"),
    ("capture.top_k", "--top-k"),
    ("capture.top_p", "--top-p"),
    ("capture.min_k", "--min-k"),
    ("capture.draws", "--sample / --sample-seed"),
    ("capture.hidden_layers", "--hidden-layers"),
    ("data.sources", "--input"),
    ("data.hash", "--input"),
    ("data.fields.token_ids", "--token-ids"),
    ("data.fields", "the --*-field options"),
    ("data.max_len", "--max-len"),
    ("data.packing", "--pack"),
    ("data.train_on_all_tokens", "--train-on-all-tokens"),
    ("data.skip_invalid", "--skip-invalid"),
    ("sharding.shard_tokens", "--shard-tokens"),
    ("sharding.zstd_level", "--zstd-level"),
    ("sharding.row_group_rows", "--row-group-rows"),
];

/// The fields where two JSON descriptions of settings differ, as `path: theirs there,
/// ours here` lines.
pub fn json_diff(ours: &Json, theirs: &Json) -> Vec<String> {
    let mut out = vec![];
    diff_json("", ours, theirs, &mut out);
    out
}

fn diff_json(path: &str, a: &Json, b: &Json, out: &mut Vec<String>) {
    match (a, b) {
        // Every key of either side: a setting recorded only when on (`top_p`, the
        // token-id fields) differs from its absence.
        (Json::Object(x), Json::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff_json(&p, x.get(k).unwrap_or(&Json::Null), y.get(k).unwrap_or(&Json::Null), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {b} there, {a} here")),
        _ => {}
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_present_on_one_side_only_differs() {
        let with = serde_json::json!({"capture": {"top_k": 16, "top_p": 0.9}});
        let without = serde_json::json!({"capture": {"top_k": 16}});
        assert_eq!(json_diff(&without, &with), ["capture.top_p: 0.9 there, null here"]);
        assert_eq!(json_diff(&with, &without), ["capture.top_p: null there, 0.9 here"]);
        assert!(json_diff(&with, &with).is_empty());
    }
}
