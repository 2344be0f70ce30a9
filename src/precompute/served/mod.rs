//! Targets from a served teacher (`distill import-logprobs`): a teacher too large for a
//! plain forward pass (70B+, tensor-parallel, FP8) is served by vLLM or SGLang, which
//! score prompts and return each position's top log-probabilities. This is a second
//! producer of the rows `precompute` writes, through the same planning and writer:
//!
//! 1. `--write-requests FILE` plans the rows exactly as `precompute` does (tokenizer,
//!    chat template, max length, packing) and writes each document's token ids;
//! 2. `scripts/capture_served.py` sends them to the server (ids, never text, so nothing
//!    is re-tokenised) and saves each response beside its document's id;
//! 3. `--responses FILE...` checks each response against the planned rows and writes
//!    the shard set: top-k ids and log-probs, the label's log-prob (listed by the server
//!    even when outside its top-k), and the tail's log-mass `log(1 - sum top-k p)`.
//!
//! Refused by name (file, line, sample, position): ids that differ from the tokenizer's
//! (a response for another tokenizer or text), fewer positions or ids than asked (a
//! truncated response, a server capped below `--top-k`), log-probs that are not
//! normalised (a server returning logits: vLLM's `--logprobs-mode raw_logits`), a sample
//! answered twice, a planned document with no response.
//!
//! A server normalises over all of the model's rows; `precompute` over the tokenizer's
//! ids (`CaptureSettings::vocab_limit`). Listed ids past the tokenizer (padded embedding
//! rows, as in Qwen2) are dropped and their mass stays in the tail; the manifest says so.
pub mod formats;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::capture::keeps_id;
use super::plan::prepare;
use super::{PrecomputeConfig, Summary};
use crate::dataset::sequence::Sequence;
use crate::files::{checksum_file, write_atomic};
use crate::shards::manifest::{ServedInfo, SourceFile};
use crate::shards::row::TopKTargets;
use formats::{parse_response, ServedDoc, ServedPosition};

/// Log-probabilities above this, or listed probabilities summing above 1 plus this,
/// are not normalised (float32 log-softmax sums to 1 within ~1e-6).
const NORMALISED_WITHIN: f64 = 1e-3;

/// Writes one request per planned document: `{"id", "prompt_token_ids"}`, in data order.
/// Returns the number of documents. An existing file is replaced only with `overwrite`.
pub fn write_requests(cfg: &PrecomputeConfig, path: &Path) -> Result<usize> {
    if path.exists() && !cfg.overwrite {
        bail!("{} exists; use another path, or --overwrite to replace it", path.display());
    }
    let prepared = prepare(cfg)?;
    check_unique_samples(&prepared.rows)?;
    let mut out = String::new();
    let mut n = 0;
    for row in &prepared.rows {
        for (sample, ids) in documents(row) {
            out.push_str(&serde_json::to_string(&serde_json::json!({"id": sample, "prompt_token_ids": ids}))?);
            out.push('\n');
            n += 1;
        }
    }
    write_atomic(path, out.as_bytes())?;
    Ok(n)
}

/// Writes (or resumes) the shard set of `cfg` from the server's `responses`.
pub fn import(cfg: &PrecomputeConfig, responses: &[PathBuf]) -> Result<Summary> {
    cfg.validate()?;
    if cfg.sample > 0 || !cfg.hidden_layers.is_empty() {
        bail!("a server returns top log-probabilities only: --sample and --hidden-layers need `distill precompute`");
    }
    if responses.is_empty() {
        bail!("--responses names no file");
    }
    let mut prepared = prepare(cfg)?;
    let docs = ResponseIndex::build(responses)?;
    let vocab = prepared.settings.tokenizer.vocab_size;
    let model_rows = prepared.teacher_config.vocab_size;
    prepared.settings.teacher.dtype = "served".into();
    prepared.settings.capture.served = Some(ServedInfo {
        responses: responses
            .iter()
            .map(|p| Ok(SourceFile { path: p.display().to_string(), bytes: std::fs::metadata(p)?.len() }))
            .collect::<Result<_>>()?,
        responses_hash: responses.iter().map(|p| checksum_file(p)).collect::<Result<Vec<_>>>()?.join(","),
        formats: docs.formats.iter().map(|&f| String::from(f)).collect(),
        normalised_over: format!(
            "the model's {model_rows} rows (the server's softmax); listed ids past the tokenizer's {vocab} are dropped into the tail"
        ),
    });
    let rule = KeepRule { k: cfg.top_k, top_p: cfg.top_p, min_k: cfg.min_k, vocab };
    check_unique_samples(&prepared.rows)?;
    // Every row is checked before the output is touched: a bad response leaves nothing.
    for row in &prepared.rows {
        row_targets(row, &docs, &rule)?;
    }
    super::write_without_teacher(cfg, &prepared, |row| Ok((row_targets(row, &docs, &rule)?, vec![])))
}

/// A response as read: where it came from and what it says.
struct Located {
    location: String,
    doc: ServedDoc,
}

/// Where each sample's response lies (file, byte offset, line), so that responses are
/// read one document at a time instead of all at once (a 20-id capture holds ~320 bytes
/// per token as parsed numbers: 3 GB for 10M tokens).
struct ResponseIndex {
    files: Vec<PathBuf>,
    by_id: HashMap<String, (usize, u64, usize)>,
    formats: BTreeSet<&'static str>,
}

impl ResponseIndex {
    /// Reads every line once: each must parse as a response; a sample answered twice
    /// is refused.
    fn build(files: &[PathBuf]) -> Result<Self> {
        let mut index = ResponseIndex { files: files.to_vec(), by_id: HashMap::new(), formats: BTreeSet::new() };
        for (f, file) in files.iter().enumerate() {
            let mut reader =
                BufReader::new(std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?);
            let (mut offset, mut line_no, mut line) = (0u64, 0usize, String::new());
            loop {
                line.clear();
                let n = reader.read_line(&mut line).with_context(|| format!("reading {}", file.display()))?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                if !line.trim().is_empty() {
                    let (id, located) = parse_line(&line, format!("{}:{line_no}", file.display()))?;
                    if let Some(&(ff, _, first)) = index.by_id.get(&id) {
                        bail!(
                            "{}: sample {id:?} is answered twice (first at {}:{first}); keep one response per sample",
                            located.location,
                            files[ff].display()
                        );
                    }
                    index.formats.insert(located.doc.format);
                    index.by_id.insert(id, (f, offset, line_no));
                }
                offset += n as u64;
            }
        }
        Ok(index)
    }

    /// The response of `sample`, read again from its file.
    fn get(&self, sample: &str) -> Result<Option<Located>> {
        let Some(&(f, offset, line_no)) = self.by_id.get(sample) else { return Ok(None) };
        let file = &self.files[f];
        let mut reader =
            BufReader::new(std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?);
        reader.seek(SeekFrom::Start(offset))?;
        let mut line = String::new();
        reader.read_line(&mut line).with_context(|| format!("reading {}", file.display()))?;
        Ok(Some(parse_line(&line, format!("{}:{line_no}", file.display()))?.1))
    }
}

/// One line of a response file: `{"id", "prompt_token_ids"?, "response"}`.
fn parse_line(line: &str, location: String) -> Result<(String, Located)> {
    let record: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("{location}: not JSON (a truncated line from an interrupted capture?)"))?;
    let id = match record.get("id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        _ => bail!("{location}: no `id` naming the sample the response scores"),
    };
    let request_ids: Option<Vec<u32>> = record
        .get("prompt_token_ids")
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .with_context(|| format!("{location}: prompt_token_ids"))?;
    let response = record.get("response").ok_or_else(|| anyhow!("{location}: no `response`"))?;
    let doc =
        parse_response(response, request_ids.as_deref()).with_context(|| format!("{location} (sample {id:?})"))?;
    Ok((id, Located { location, doc }))
}

/// Sample ids key the responses: two documents of one id would share one response.
fn check_unique_samples(rows: &[Sequence]) -> Result<()> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for row in rows {
        for sample in &row.sample_ids {
            if let Some(first) = seen.insert(sample, row.row_index) {
                bail!(
                    "sample id {sample:?} names two documents (rows {first} and {}): responses are keyed by it; give every input row its own `id`",
                    row.row_index
                );
            }
        }
    }
    Ok(())
}

/// Each document of a row: its sample id and its token ids.
fn documents(row: &Sequence) -> impl Iterator<Item = (&str, &[u32])> {
    let mut start = 0;
    row.sample_ids.iter().zip(&row.doc_lengths).map(move |(sample, &n)| {
        let ids = &row.ids[start..start + n as usize];
        start += n as usize;
        (sample.as_str(), ids)
    })
}

struct KeepRule {
    k: usize,
    top_p: Option<f64>,
    min_k: usize,
    /// The tokenizer's ids: listed ids at or past it are padded rows.
    vocab: usize,
}

/// The row's targets from its documents' responses, trained positions in token order.
fn row_targets(row: &Sequence, docs: &ResponseIndex, rule: &KeepRule) -> Result<TopKTargets> {
    let mut targets = TopKTargets::empty(rule.k);
    if rule.top_p.is_some() {
        targets.lengths = Some(vec![]);
    }
    let mut start = 0;
    for (sample, ids) in documents(row) {
        let served = docs.get(sample)?.ok_or_else(|| {
            anyhow!("row {} (sample {sample:?}): no response names this sample; capture it (scripts/capture_served.py resumes)", row.row_index)
        })?;
        let at = |what: String| format!("{} (sample {sample:?}, row {}): {what}", served.location, row.row_index);
        if let Some(j) = (0..ids.len().min(served.doc.ids.len())).find(|&j| served.doc.ids[j] != ids[j]) {
            bail!(at(format!(
                "token {j} is id {} in the response but {} in the tokenizer's encoding: a response for another tokenizer or another text",
                served.doc.ids[j], ids[j]
            )));
        }
        if served.doc.ids.len() < ids.len() {
            bail!(at(format!(
                "the server scored {} tokens of {} (a truncated response)",
                served.doc.ids.len(),
                ids.len()
            )));
        }
        for (j, &label) in ids.iter().enumerate().skip(1) {
            if row.loss_mask[start + j] {
                push_position(&mut targets, &served.doc.positions[j - 1], label, rule)
                    .map_err(|e| anyhow!(at(format!("position {j}: {e}"))))?;
            }
        }
        start += ids.len();
    }
    Ok(targets)
}

/// One position's targets from the server's list.
fn push_position(t: &mut TopKTargets, p: &ServedPosition, label_id: u32, rule: &KeepRule) -> Result<()> {
    let listed_label = p.top.iter().any(|&(id, _)| id == label_id);
    let values = p.top.iter().map(|e| e.1).chain((!listed_label).then_some(p.label));
    let mut sum = 0.0;
    for v in values {
        if v.is_nan() || v > NORMALISED_WITHIN {
            bail!("{v} is not a log-probability: the server returns logits (serve vLLM with --logprobs-mode raw_logprobs)");
        }
        sum += v.exp();
    }
    if sum > 1.0 + NORMALISED_WITHIN {
        bail!("the listed probabilities sum to {sum:.4}: not normalised log-probs (a server returning logits or scaled values)");
    }
    let real: Vec<(u32, f64)> =
        p.top.iter().copied().filter(|&(id, _)| (id as usize) < rule.vocab).take(rule.k).collect();
    if real.len() < rule.k {
        bail!(
            "the server lists {} ids of the tokenizer's vocabulary, fewer than --top-k {}: ask for more (vLLM caps prompt_logprobs at --max-logprobs, 20 by default)",
            real.len(),
            rule.k
        );
    }
    let mut kept = 0;
    let mut mass = 0.0;
    for (i, &(_, lp)) in real.iter().enumerate() {
        if rule.top_p.is_some_and(|top_p| !keeps_id(i, mass, top_p, rule.min_k)) {
            break;
        }
        mass += lp.exp();
        kept += 1;
    }
    let kept = &real[..kept];
    let mut tail = if mass < 1.0 { (-mass).ln_1p() } else { f64::NEG_INFINITY };
    if !kept.iter().any(|&(id, _)| id == label_id) {
        tail = tail.max(p.label); // the label lies in the tail
    }
    t.ids.extend(kept.iter().map(|e| e.0));
    t.logprobs.extend(kept.iter().map(|e| f16::from_f64(e.1.min(0.0))));
    t.tail_logmass.push(tail as f32);
    t.target_logprob.push(p.label.min(0.0) as f32);
    if let Some(lengths) = &mut t.lengths {
        lengths.push(kept.len() as u32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(top: &[(u32, f64)], label: f64) -> ServedPosition {
        ServedPosition { top: top.to_vec(), label }
    }

    #[test]
    fn tail_holds_the_rest_and_the_label() {
        let rule = KeepRule { k: 2, top_p: None, min_k: 0, vocab: 100 };
        let mut t = TopKTargets::empty(2);
        let p =
            position(&[(4, 0.5f64.ln()), (9, 0.25f64.ln()), (99, 0.125f64.ln()), (150, 0.0625f64.ln())], 0.01f64.ln());
        push_position(&mut t, &p, 7, &rule).unwrap();
        assert_eq!(t.ids, vec![4, 9]);
        assert!((t.tail_logmass[0] - 0.25f32.ln()).abs() < 1e-6);
        assert!((t.target_logprob[0] - 0.01f32.ln()).abs() < 1e-6);
        // A padded row (150 >= 100) is dropped, not kept, even when it ranks high.
        let padded = position(&[(150, 0.5f64.ln()), (4, 0.25f64.ln()), (9, 0.125f64.ln())], 0.25f64.ln());
        push_position(&mut t, &padded, 4, &rule).unwrap();
        assert_eq!(t.ids[2..], [4, 9]);
    }

    #[test]
    fn adaptive_count_follows_precompute_rule() {
        let rule = KeepRule { k: 4, top_p: Some(0.6), min_k: 3, vocab: 100 };
        let mut t = TopKTargets::empty(4);
        t.lengths = Some(vec![]);
        let top = [(1, 0.7f64.ln()), (2, 0.1f64.ln()), (3, 0.1f64.ln()), (4, 0.05f64.ln())];
        push_position(&mut t, &position(&top, 0.7f64.ln()), 1, &rule).unwrap();
        assert_eq!(t.lengths, Some(vec![3]), "0.7 reaches 0.6 after one id; the floor keeps three");
    }

    #[test]
    fn refuses_unnormalised_and_short_lists() {
        let rule = KeepRule { k: 2, top_p: None, min_k: 0, vocab: 100 };
        let mut t = TopKTargets::empty(2);
        let logits = position(&[(1, 3.0), (2, 1.0)], 1.0);
        assert!(push_position(&mut t, &logits, 1, &rule).unwrap_err().to_string().contains("logits"));
        let scaled = position(&[(1, -0.1), (2, -0.2)], -0.1);
        assert!(push_position(&mut t, &scaled, 1, &rule).unwrap_err().to_string().contains("sum to"));
        let short = position(&[(1, -0.1)], -0.1);
        assert!(push_position(&mut t, &short, 1, &rule).unwrap_err().to_string().contains("fewer than --top-k 2"));
    }
}
