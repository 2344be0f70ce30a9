//! Opening a shard set for training: the manifest and every listed shard are checked
//! (present, complete, checksum) before use, the student's tokenizer is checked against
//! the one the targets were made with, and row groups are decoded from memory-mapped
//! files (no read of whole files) into `ShardRow`s. Each shard's Parquet footer is parsed
//! once, when the set is opened (arrow-rs `ArrowReaderMetadata`), not per row group.
use anyhow::{bail, Context, Result};
use arrow::array::{
    Array, AsArray, BooleanArray, FixedSizeListArray, Int32Array, ListArray, RecordBatch, StringArray, UInt16Array,
    UInt64Array, UInt8Array,
};
use arrow::datatypes::{Float16Type, Float32Type, Int32Type, UInt16Type, UInt64Type, UInt8Type};
use bytes::Bytes;
use half::f16;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use super::row::{HiddenTargets, ShardRow, TailDraws, TopKTargets, UldTargets};
use super::schema::{columns, hidden_column, hidden_rms_column, IdType};
use crate::dataset::sequence::Sequence;

/// A row group of one shard: the reader's unit of decoding and shuffling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroupRef {
    pub shard: usize,
    pub row_group: usize,
    pub rows: usize,
}

/// One listed shard: its mapped bytes and its parsed Parquet metadata.
struct OpenShard {
    bytes: Bytes,
    metadata: ArrowReaderMetadata,
}

pub struct ShardSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<OpenShard>,
    row_groups: Vec<RowGroupRef>,
}

impl ShardSet {
    /// Opens `dir`, refusing an incomplete set (unless `allow_incomplete`), a missing
    /// shard, or one whose size or checksum differs from the manifest.
    pub fn open(dir: &Path, allow_incomplete: bool) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        if !manifest.complete && !allow_incomplete {
            bail!(
                "{}: the shard set is incomplete ({} of {} shards); finish the precompute or allow incomplete sets",
                dir.display(),
                manifest.shards.len(),
                manifest.planned_shards
            );
        }
        let manifest_path = Manifest::path(dir);
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = manifest.shards.iter().find(|e| !seen.insert(&e.file)) {
            bail!("{}: shard {} is listed twice", manifest_path.display(), twice.file);
        }
        let expected = manifest.settings.layout().arrow_schema();
        let mut shards = vec![];
        let mut row_groups = vec![];
        for (i, entry) in manifest.shards.iter().enumerate() {
            let path = dir.join(&entry.file);
            let bytes = Bytes::from_owner(entry.open_verified(dir)?);
            let metadata = ArrowReaderMetadata::load(&bytes, ArrowReaderOptions::default())
                .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
            let rows = metadata.metadata().file_metadata().num_rows();
            if rows != entry.rows as i64 {
                bail!("{}: holds {rows} rows, the manifest says {}", path.display(), entry.rows);
            }
            if metadata.schema().fields() != expected.fields() {
                bail!(
                    "{}: its columns are not those of the manifest's capture settings ({}); the shard belongs to another set",
                    path.display(),
                    expected.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            for (g, rg) in metadata.metadata().row_groups().iter().enumerate() {
                row_groups.push(RowGroupRef { shard: i, row_group: g, rows: rg.num_rows() as usize });
            }
            shards.push(OpenShard { bytes, metadata });
        }
        if row_groups.iter().all(|g| g.rows == 0) && !allow_incomplete {
            bail!("{}: the shard set holds no rows", manifest_path.display());
        }
        Ok(ShardSet { dir: dir.to_path_buf(), manifest, shards, row_groups })
    }

    /// Refuses targets made with another tokenizer than the student's (unless `force`)
    /// or with ids beyond the student's embedding (always: they cannot be trained on),
    /// naming both.
    pub fn check_student(&self, tokenizer_hash: &str, student_vocab: usize, force: bool) -> Result<()> {
        let t = &self.manifest.settings.tokenizer;
        let manifest = Manifest::path(&self.dir);
        if t.vocab_size > student_vocab {
            bail!(
                "{}: the shards' vocabulary has {} ids but the student's embedding has {student_vocab} rows; the student cannot learn these targets (not even with --force-tokenizer)",
                manifest.display(),
                t.vocab_size
            );
        }
        if t.hash != tokenizer_hash && !force {
            bail!(
                "{}: the targets were made for another tokenizer than the student's: tokenizer.json hash {} (shards) vs {tokenizer_hash} (student); use a student with the teacher's tokenizer, train with --cross-tokenizer (another vocabulary), or --force-tokenizer (the same ids in another file)",
                manifest.display(),
                t.hash
            );
        }
        Ok(())
    }

    /// Compressed bytes of each top-level column over all shards, in schema order.
    pub fn column_bytes(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = vec![];
        for shard in &self.shards {
            for rg in shard.metadata.metadata().row_groups() {
                for c in rg.columns() {
                    let name = c.column_path().parts()[0].clone();
                    match out.iter_mut().find(|(n, _)| *n == name) {
                        Some(entry) => entry.1 += c.compressed_size() as u64,
                        None => out.push((name, c.compressed_size() as u64)),
                    }
                }
            }
        }
        out
    }

    pub fn row_groups(&self) -> &[RowGroupRef] {
        &self.row_groups
    }

    /// Every row's `row_index`, in stored order, read from that column alone.
    pub fn row_indices(&self) -> Result<Vec<u64>> {
        let mut out = vec![];
        for (entry, shard) in self.manifest.shards.iter().zip(&self.shards) {
            let schema = shard.metadata.metadata().file_metadata().schema_descr();
            let mask = ProjectionMask::columns(schema, [columns::ROW_INDEX]);
            let reader =
                ParquetRecordBatchReaderBuilder::new_with_metadata(shard.bytes.clone(), shard.metadata.clone())
                    .with_projection(mask)
                    .build()?;
            for batch in reader {
                let batch =
                    batch.with_context(|| format!("{}: cannot decode", self.dir.join(&entry.file).display()))?;
                out.extend(batch.column(0).as_primitive::<UInt64Type>().values().iter().copied());
            }
        }
        Ok(out)
    }

    /// Decodes one row group into rows.
    pub fn decode(&self, rg: RowGroupRef) -> Result<Vec<ShardRow>> {
        let file = self.dir.join(&self.manifest.shards[rg.shard].file).display().to_string();
        let shard = &self.shards[rg.shard];
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(shard.bytes.clone(), shard.metadata.clone())
            .with_row_groups(vec![rg.row_group])
            .with_batch_size(rg.rows.max(1))
            .build()?;
        let mut rows = vec![];
        for batch in reader {
            let batch = batch.with_context(|| format!("{file}: cannot decode row group {}", rg.row_group))?;
            rows.extend(self.rows_of(&batch).with_context(|| format!("{file}: row group {}", rg.row_group))?);
        }
        let limits = self.manifest.settings.row_limits();
        let (first, end) = self.manifest.shards[rg.shard].row_range;
        for (i, (row, counts)) in rows.iter().enumerate() {
            let index = row.sequence.row_index;
            let at = || format!("{file}: row group {}, row {i} (row_index {index})", rg.row_group);
            if !(first..end).contains(&index) {
                bail!(
                    "{}: column `{}`: outside the shard's rows {first}..{end} in the manifest",
                    at(),
                    columns::ROW_INDEX
                );
            }
            row.check(&limits).with_context(at)?;
            let held = [row.sequence.len(), row.num_targets()];
            for ((column, stored), held) in [columns::NUM_TOKENS, columns::NUM_TARGETS].iter().zip(counts).zip(held) {
                if *stored as i64 != held as i64 {
                    bail!("{}: column `{column}` says {stored}, the row holds {held}", at());
                }
            }
        }
        Ok(rows.into_iter().map(|(row, _)| row).collect())
    }

    /// The rows of a batch, each with its stored `num_tokens` and `num_targets`.
    fn rows_of(&self, batch: &RecordBatch) -> Result<Vec<(ShardRow, [i32; 2])>> {
        use columns::*;
        let cap = &self.manifest.settings.capture;
        let adaptive = self.manifest.settings.layout().adaptive;
        let col = |name: &str| batch.column_by_name(name).with_context(|| format!("column `{name}` is missing"));
        let list = |name: &str| -> Result<ListArray> {
            col(name)?.as_list_opt::<i32>().cloned().with_context(|| format!("column `{name}` is not a list"))
        };
        let row_index: UInt64Array = col(ROW_INDEX)?
            .as_primitive_opt::<UInt64Type>()
            .cloned()
            .with_context(|| format!("column `{ROW_INDEX}` is not uint64"))?;
        let int32 = |name: &str| -> Result<Int32Array> {
            col(name)?.as_primitive_opt::<Int32Type>().cloned().with_context(|| format!("column `{name}` is not int32"))
        };
        let (num_tokens, num_targets) = (int32(NUM_TOKENS)?, int32(NUM_TARGETS)?);
        let (samples, docs, ids, mask) = (list(SAMPLE_IDS)?, list(DOC_LENGTHS)?, list(INPUT_IDS)?, list(LOSS_MASK)?);
        let (tail, target) = (list(TAIL_LOGMASS)?, list(TARGET_LOGPROB)?);
        let topk = if cap.top_k > 0 { Some((list(TOPK_IDS)?, list(TOPK_LOGPROBS)?)) } else { None };
        let draws = if cap.draws.is_some() { Some((list(DRAW_IDS)?, list(DRAW_COUNTS)?)) } else { None };
        let sampled = if cap.sampler_logprobs { Some(list(SAMPLER_LOGPROB)?) } else { None };
        let uld =
            if cap.cross_tokenizer.is_some() { Some((list(ULD_LOGPROBS)?, list(GROUP_CONTINUES)?)) } else { None };
        let hidden: Vec<(usize, ListArray, ListArray)> = cap
            .hidden_layers
            .iter()
            .map(|&l| Ok((l, list(&hidden_column(l))?, list(&hidden_rms_column(l))?)))
            .collect::<Result<_>>()?;
        let mut rows = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let strings = samples.value(r);
            let strings: &StringArray =
                strings.as_string_opt::<i32>().with_context(|| format!("`{SAMPLE_IDS}` items are not strings"))?;
            let hidden = hidden
                .iter()
                .map(|(layer, values, rms)| {
                    let values = values.value(r);
                    let width = fixed_width(&values)?;
                    Ok(HiddenTargets { layer: *layer, width, values: fixed_f16(&values)?, rms: f32s(&rms.value(r))? })
                })
                .collect::<Result<_>>()?;
            let sequence = Sequence {
                row_index: row_index.value(r),
                sample_ids: strings.iter().map(|s| s.unwrap_or_default().to_string()).collect(),
                doc_lengths: i32s(&docs.value(r))?.into_iter().map(|x| x as u32).collect(),
                ids: i32s(&ids.value(r))?.into_iter().map(|x| x as u32).collect(),
                loss_mask: bools(&mask.value(r))?,
                sampler_logprobs: sampled.as_ref().filter(|l| l.is_valid(r)).map(|l| f32s(&l.value(r))).transpose()?,
            };
            let (lengths, ids, logprobs) = match &topk {
                Some((ids, lps)) if adaptive => {
                    let ((lengths, ids), (lp_lengths, lps)) = (lists(&ids.value(r))?, lists(&lps.value(r))?);
                    if lengths != lp_lengths {
                        bail!("`{TOPK_IDS}` and `{TOPK_LOGPROBS}` hold lists of different lengths");
                    }
                    (Some(lengths), id_values(ids.as_ref(), cap.id_type)?, f16s(lps.as_ref())?)
                }
                Some((ids, lps)) => (None, fixed_ids(&ids.value(r), cap.id_type)?, fixed_f16(&lps.value(r))?),
                None => (None, vec![], vec![]),
            };
            let topk = TopKTargets {
                k: cap.top_k,
                lengths,
                ids,
                logprobs,
                tail_logmass: f32s(&tail.value(r))?,
                target_logprob: f32s(&target.value(r))?,
                draws: draws
                    .as_ref()
                    .map(|(ids, counts)| tail_draws(&ids.value(r), &counts.value(r), cap.id_type))
                    .transpose()?,
                uld: uld
                    .as_ref()
                    .map(|(lps, cont)| {
                        Ok::<_, anyhow::Error>(UldTargets {
                            logprobs: fixed_f16(&lps.value(r))?,
                            continues: bools(&cont.value(r))?,
                        })
                    })
                    .transpose()?,
            };
            rows.push((ShardRow { sequence, topk, hidden }, [num_tokens.value(r), num_targets.value(r)]));
        }
        Ok(rows)
    }
}

/// One row's draws: per position a list of ids and a list of counts of equal lengths.
fn tail_draws(ids: &dyn Array, counts: &dyn Array, id_type: IdType) -> Result<TailDraws> {
    let ((lengths, ids), (count_lengths, counts)) = (lists(ids)?, lists(counts)?);
    if lengths != count_lengths {
        bail!("`{}` and `{}` hold lists of different lengths", columns::DRAW_IDS, columns::DRAW_COUNTS);
    }
    let counts: &UInt8Array = counts.as_primitive_opt::<UInt8Type>().context("expected uint8 counts")?;
    Ok(TailDraws { lengths, ids: id_values(ids.as_ref(), id_type)?, counts: counts.values().to_vec() })
}

/// A list array's list lengths and the values they cover.
fn lists(a: &dyn Array) -> Result<(Vec<u32>, std::sync::Arc<dyn Array>)> {
    let a = a.as_list_opt::<i32>().context("expected lists")?;
    let (first, last) = (a.offsets()[0] as usize, a.offsets().last() as usize);
    Ok((a.offsets().lengths().map(|n| n as u32).collect(), a.values().slice(first, last - first)))
}

fn f16s(a: &dyn Array) -> Result<Vec<f16>> {
    Ok(a.as_primitive_opt::<Float16Type>().context("expected float16 values")?.values().to_vec())
}

fn i32s(a: &dyn Array) -> Result<Vec<i32>> {
    Ok(a.as_primitive_opt::<Int32Type>().context("expected int32 values")?.values().to_vec())
}

fn f32s(a: &dyn Array) -> Result<Vec<f32>> {
    Ok(a.as_primitive_opt::<Float32Type>().context("expected float32 values")?.values().to_vec())
}

fn bools(a: &dyn Array) -> Result<Vec<bool>> {
    let b: &BooleanArray = a.as_boolean_opt().context("expected bool values")?;
    Ok(b.values().iter().collect())
}

fn fixed_width(a: &dyn Array) -> Result<usize> {
    let f: &FixedSizeListArray = a.as_fixed_size_list_opt().context("expected fixed-size lists")?;
    Ok(f.value_length() as usize)
}

fn fixed_values(a: &dyn Array) -> Result<std::sync::Arc<dyn Array>> {
    let f: &FixedSizeListArray = a.as_fixed_size_list_opt().context("expected fixed-size lists")?;
    Ok(f.values().slice(f.offset() * f.value_length() as usize, f.len() * f.value_length() as usize))
}

fn fixed_f16(a: &dyn Array) -> Result<Vec<f16>> {
    f16s(fixed_values(a)?.as_ref())
}

fn fixed_ids(a: &dyn Array, id_type: IdType) -> Result<Vec<u32>> {
    id_values(fixed_values(a)?.as_ref(), id_type)
}

fn id_values(v: &dyn Array, id_type: IdType) -> Result<Vec<u32>> {
    Ok(match id_type {
        IdType::Uint16 => {
            let v: &UInt16Array = v.as_primitive_opt::<UInt16Type>().context("expected uint16 ids")?;
            v.values().iter().map(|&x| x as u32).collect()
        }
        IdType::Int32 => {
            let v: &Int32Array = v.as_primitive_opt::<Int32Type>().context("expected int32 ids")?;
            v.values().iter().map(|&x| x as u32).collect()
        }
    })
}
