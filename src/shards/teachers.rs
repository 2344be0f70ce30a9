//! `distill merge-teachers`: several teachers' shard sets over the same rows become one
//! ordinary set whose targets are the weighted mixture of the teachers' distributions
//! (`mixture`), so `train` and `eval` read it as they read one teacher's.
//!
//! The sets must share the tokenizer and the data, and hold the same rows in the same
//! order (row index, sample ids, document lengths, input ids, loss mask): the first
//! difference is named. Weights may depend on the data file a document came from (a
//! domain expert per file): the manifest's `source_examples` fix which row indices
//! each file holds. The output is written in a staging directory and moved into place
//! only when complete.
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::dir::create_staged;
use super::manifest::{json_diff, Manifest, MixedTeacher, MixtureInfo, RouteInfo, SourceWeights};
use super::mixture::{mix_position, TeacherPosition, UNLISTED_RULE};
use super::reader::ShardSet;
use super::row::{ShardRow, TopKTargets};
use super::writer::RollingShards;
use crate::dataset::read::{hash_inputs, record_field};
use crate::dataset::FieldNames;

/// One input: a teacher's shard set and its weight.
#[derive(Debug, Clone)]
pub struct TeacherSet {
    pub dir: PathBuf,
    pub weight: f64,
}

#[derive(Debug, Clone, Default)]
pub struct MixOptions {
    /// Ids kept per position (default: the largest input top-k).
    pub top_k: Option<usize>,
    /// A data source (its path in the manifest, or its file name) and one weight per
    /// teacher for the documents read from it.
    pub source_weights: Vec<(String, Vec<f64>)>,
    /// Index of the input whose hidden-state columns the output carries.
    pub hidden_from: Option<usize>,
    /// Per-document routing by a field of the data (over file and global weights).
    pub route: Option<Route>,
}

/// Each document whose data row has `field` equal to `names[t]` takes teacher t's
/// targets alone (the 2026 recipe: every sample scored by its domain's teacher).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub field: String,
    /// One name per teacher, in the order the sets are given.
    pub names: Vec<String>,
}

pub fn merge_teachers(inputs: &[TeacherSet], opts: &MixOptions, output: &Path) -> Result<Manifest> {
    if inputs.len() < 2 {
        bail!("merge-teachers needs at least two teachers' shard sets, got {}", inputs.len());
    }
    let weights = normalised(&inputs.iter().map(|i| i.weight).collect::<Vec<_>>())
        .context("the teachers' weights (SET:WEIGHT)")?;
    let sets: Vec<ShardSet> = inputs.iter().map(|i| ShardSet::open(&i.dir, false)).collect::<Result<_>>()?;
    check_compatible(&sets)?;
    let largest_k = sets.iter().map(|s| s.manifest.settings.capture.top_k).max().unwrap_or(0);
    let keep = opts.top_k.unwrap_or(largest_k);
    if keep == 0 || keep > largest_k {
        bail!("--top-k {keep}: the union of the teachers' lists holds at least {largest_k} ids at every position; choose 1..={largest_k}");
    }
    let first = &sets[0].manifest;
    let sources = SourceMap::new(&sets[0], &opts.source_weights, opts.route.as_ref(), inputs.len())?;
    if let Some(h) = opts.hidden_from {
        if h >= sets.len() {
            bail!("--hidden-from {h}: there are {} teachers (0..{})", sets.len(), sets.len());
        }
    }
    let base = &sets[opts.hidden_from.unwrap_or(0)].manifest.settings;
    let mut settings = base.clone();
    settings.data = first.settings.data.clone();
    settings.sharding = first.settings.sharding.clone();
    settings.capture.top_k = keep;
    settings.capture.tail = "log of the mixture's mass outside the kept ids (float32, -inf when none)".into();
    if opts.hidden_from.is_none() {
        settings.capture.hidden_layers.clear();
    }
    settings.mixture = Some(MixtureInfo {
        teachers: sets
            .iter()
            .zip(inputs)
            .zip(&weights)
            .map(|((s, i), &weight)| MixedTeacher {
                set: i.dir.display().to_string(),
                set_hash: s.manifest.shards_hash(),
                teacher: s.manifest.settings.teacher.clone(),
                tokenizer_hash: s.manifest.settings.tokenizer.hash.clone(),
                top_k: s.manifest.settings.capture.top_k,
                weight,
            })
            .collect(),
        source_weights: sources.recorded(first),
        route: opts.route.as_ref().map(|r| RouteInfo {
            field: r.field.clone(),
            names: r.names.clone(),
            examples: (0..r.names.len()).map(|t| sources.routes.iter().filter(|&&x| x == Some(t)).count()).collect(),
            unrouted: sources.routes.iter().filter(|x| x.is_none()).count(),
        }),
        rule: UNLISTED_RULE.into(),
    });
    let out = create_staged(output)?;
    let mut manifest = Manifest::new(settings.clone(), first.slices[0], 0, first.skipped.clone());
    manifest.slices = first.slices.clone();
    manifest.source_examples = first.source_examples.clone();
    let mixer = Mixer { weights, sources, keep, vocab: settings.tokenizer.vocab_size, hidden_from: opts.hidden_from };
    let mut shards = RollingShards::new(&out.dir, &settings)?;
    write_mixture(&sets, &mixer, &mut shards, &mut manifest)?;
    shards.finish(&mut manifest)?;
    out.finish()?;
    Ok(manifest)
}

/// Weights scaled to sum to 1; each must be finite and >= 0, and one > 0.
fn normalised(weights: &[f64]) -> Result<Vec<f64>> {
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        bail!("weight {w} is not a finite number >= 0");
    }
    // Scaled by the largest first: a sum of huge weights (1e308 + 1e308) would overflow
    // to inf and make every weight 0.
    let largest = weights.iter().copied().fold(0.0, f64::max);
    if largest <= 0.0 {
        bail!("the weights {weights:?} sum to 0");
    }
    let scaled: Vec<f64> = weights.iter().map(|w| w / largest).collect();
    let sum: f64 = scaled.iter().sum();
    Ok(scaled.iter().map(|w| w / sum).collect())
}

/// The sets must describe the same rows with the same tokenizer, and hold top-k lists
/// the mixture can combine.
fn check_compatible(sets: &[ShardSet]) -> Result<()> {
    let first = &sets[0];
    for set in sets {
        let (s, dir) = (&set.manifest.settings, set.dir.display());
        let c = &s.capture;
        if c.top_k == 0 || c.top_p.is_some() || c.draws.is_some() {
            bail!(
                "{dir}: merge-teachers mixes fixed top-k lists; this set holds {} (draws have no exact mixture: precompute each teacher with --sample 0 and without --top-p)",
                if c.top_k == 0 { "draws only" } else if c.top_p.is_some() { "mass-adaptive lists" } else { "tail draws" }
            );
        }
        if s.mixture.is_some() {
            bail!("{dir} is itself a mixture; merge the teachers' own sets in one merge-teachers");
        }
        let t = (&s.tokenizer.hash, s.tokenizer.vocab_size);
        let t0 = (&first.manifest.settings.tokenizer.hash, first.manifest.settings.tokenizer.vocab_size);
        if t != t0 {
            bail!(
                "{dir} and {} were made with different tokenizers (hash {} / {} ids vs {} / {} ids): a mixture needs one vocabulary; for a teacher with another tokenizer use `train --cross-tokenizer`",
                first.dir.display(),
                t.0,
                t.1,
                t0.0,
                t0.1
            );
        }
        // Everything that decides the rows; file paths may differ between machines.
        let rows_of = |m: &Manifest| {
            let mut data = serde_json::to_value(&m.settings.data).unwrap();
            data.as_object_mut().unwrap().remove("sources");
            serde_json::json!({"data": data, "slices": m.slices, "sampler_logprobs": m.settings.capture.sampler_logprobs})
        };
        let diff = json_diff(&rows_of(&set.manifest), &rows_of(&first.manifest));
        if !diff.is_empty() {
            bail!("{dir} and {} do not cover the same rows:\n  {}", first.dir.display(), diff.join("\n  "));
        }
    }
    Ok(())
}

/// Which data file each document came from, and the weights for it.
struct SourceMap {
    /// Start of each file's row indices, and the end of the last.
    starts: Vec<u64>,
    /// Per file: the teachers' weights (None: the global weights).
    weights: Vec<Option<Vec<f64>>>,
    /// Every row's `row_index`, ascending (rows are stored in batching order, not in
    /// index order); empty without per-source weights.
    row_indices: Vec<u64>,
    /// Where each slice's rows end (for the last row of a slice).
    slice_ends: Vec<(u64, u64)>,
    /// Per example: the teacher its route names (`None`: file or global weights);
    /// empty without routing.
    routes: Vec<Option<usize>>,
    /// Per teacher: its weights alone (1 for it, 0 for the others).
    one_hot: Vec<Vec<f64>>,
}

impl SourceMap {
    fn new(set: &ShardSet, given: &[(String, Vec<f64>)], route: Option<&Route>, teachers: usize) -> Result<Self> {
        let (dir, manifest) = (&set.dir, &set.manifest);
        let sources = &manifest.settings.data.sources;
        let mut weights = vec![None; sources.len()];
        for (name, w) in given {
            let matching: Vec<usize> = (0..sources.len())
                .filter(|&i| {
                    let p = Path::new(&sources[i].path);
                    sources[i].path == *name || p.file_name().is_some_and(|f| f.to_string_lossy() == *name)
                })
                .collect();
            let &[i] = matching.as_slice() else {
                bail!(
                    "--source-weights {name}: matches {} of the data sources ({}); give a path or file name that names one",
                    matching.len(),
                    sources.iter().map(|s| s.path.as_str()).collect::<Vec<_>>().join(", ")
                );
            };
            if w.len() != teachers {
                bail!("--source-weights {name}: {} weights for {teachers} teachers", w.len());
            }
            weights[i] = Some(normalised(w).with_context(|| format!("--source-weights {name}"))?);
        }
        if (!given.is_empty() || route.is_some()) && manifest.source_examples.len() != sources.len() {
            bail!(
                "{}: the manifest does not record how many examples each data file holds (sets made before 2026-11-24 do not); precompute the teachers again for per-source weights",
                Manifest::path(dir).display()
            );
        }
        let mut starts = vec![0u64];
        for n in &manifest.source_examples {
            starts.push(starts.last().unwrap() + n);
        }
        let total = *starts.last().unwrap();
        let slice_ends = manifest
            .slices
            .iter()
            .map(|s| ((s.index as u64 * total) / s.count as u64, ((s.index as u64 + 1) * total) / s.count as u64))
            .collect();
        let mut row_indices = match given.is_empty() && route.is_none() {
            true => vec![],
            false => set.row_indices()?,
        };
        row_indices.sort_unstable();
        let routes = match route {
            Some(r) => read_routes(manifest, r, teachers, total)?,
            None => vec![],
        };
        let one_hot = (0..teachers).map(|t| (0..teachers).map(|u| f64::from(u8::from(u == t))).collect()).collect();
        Ok(SourceMap { starts, weights, row_indices, slice_ends, routes, one_hot })
    }

    fn recorded(&self, manifest: &Manifest) -> Vec<SourceWeights> {
        let sources = &manifest.settings.data.sources;
        (0..sources.len())
            .filter_map(|i| Some(SourceWeights { source: sources[i].path.clone(), weights: self.weights[i].clone()? }))
            .collect()
    }

    fn file_of(&self, example: u64) -> usize {
        self.starts.partition_point(|&s| s <= example).saturating_sub(1)
    }

    /// The examples each of the `n` documents of row `row_index` may be (`lo..=hi`):
    /// packed documents are consecutive examples, so document d lies in
    /// `[row + d, next_row - n + d]` (skipped invalid examples leave gaps).
    fn doc_examples(&self, row_index: u64, n: u64) -> Vec<(u64, u64)> {
        // Examples up to the next row by index, or to the end of this row's slice.
        let slice_end = (self.slice_ends.iter().find(|(a, b)| (*a..*b).contains(&row_index)))
            .map_or(*self.starts.last().unwrap(), |x| x.1);
        let next = self.row_indices.partition_point(|&r| r <= row_index);
        let end = self.row_indices.get(next).copied().filter(|&n| n < slice_end).unwrap_or(slice_end);
        (0..n).map(|d| (row_index + d, (end.max(row_index + n)) - n + d)).collect()
    }

    /// Each of the `n` documents' routed teacher (`None`: unrouted; all `None` without
    /// routing); refused where skipped examples hide which route a document has.
    fn doc_routes(&self, row_index: u64, n: u64) -> Result<Vec<Option<usize>>> {
        if self.routes.is_empty() {
            return Ok(vec![None; n as usize]);
        }
        let route = |e: u64| self.routes.get(e as usize).copied().flatten();
        (self.doc_examples(row_index, n).into_iter().enumerate())
            .map(|(d, (lo, hi))| {
                if (lo..=hi).any(|e| route(e) != route(lo)) {
                    bail!(
                        "row_index {row_index}: document {d} is example {lo} or up to {hi}, which route to different teachers: skipped examples hide which; precompute without --skip-invalid or without packing for routing"
                    );
                }
                Ok(route(lo))
            })
            .collect()
    }

    /// Each document's weights: its route's teacher alone, else its file's weights, else
    /// `global`; refused where skipped examples hide a document's file.
    fn row_weights<'a>(&'a self, row: &ShardRow, global: &'a [f64]) -> Result<Vec<&'a [f64]>> {
        let s = &row.sequence;
        let n = s.doc_lengths.len() as u64;
        let by_file = self.weights.iter().any(Option::is_some);
        if !by_file && self.routes.is_empty() {
            return Ok(vec![global; n as usize]);
        }
        let routes = self.doc_routes(s.row_index, n)?;
        (self.doc_examples(s.row_index, n).into_iter().zip(routes).enumerate())
            .map(|(d, ((lo, hi), route))| {
                if let Some(t) = route {
                    return Ok(self.one_hot[t].as_slice());
                }
                let (a, b) = (self.file_of(lo), self.file_of(hi));
                if by_file && a != b {
                    bail!(
                        "row_index {}: document {d} ({}) came from data file {a} or {b}: skipped examples around a file boundary hide which; precompute without --skip-invalid or without packing for per-source weights",
                        s.row_index,
                        s.sample_ids[d]
                    );
                }
                Ok(self.weights.get(a).and_then(|w| w.as_deref()).unwrap_or(global))
            })
            .collect()
    }
}

/// Which teacher each document of a set merged with `--route` was routed to, for
/// figures per teacher (`eval`); the routes are read again from the set's data files.
pub struct RowRouter {
    map: SourceMap,
    pub names: Vec<String>,
}

impl RowRouter {
    /// `None` for a set that is not routed.
    pub fn open(set: &ShardSet) -> Result<Option<Self>> {
        let Some(route) = set.manifest.settings.mixture.as_ref().and_then(|m| m.route.as_ref()) else {
            return Ok(None);
        };
        let route = Route { field: route.field.clone(), names: route.names.clone() };
        let map = SourceMap::new(set, &[], Some(&route), route.names.len())?;
        Ok(Some(RowRouter { map, names: route.names }))
    }

    /// The teacher of each of the `docs` documents of row `row_index` (`None`: unrouted).
    pub fn doc_teachers(&self, row_index: u64, docs: usize) -> Result<Vec<Option<usize>>> {
        self.map.doc_routes(row_index, docs as u64)
    }
}

/// Each example's teacher by the route field of the set's data, read again from the
/// data files (which must be the ones precomputed: their hash is checked).
fn read_routes(manifest: &Manifest, route: &Route, teachers: usize, examples: u64) -> Result<Vec<Option<usize>>> {
    if route.names.len() != teachers {
        bail!("--route {}: {} names for {teachers} teachers", route.field, route.names.len());
    }
    let data = &manifest.settings.data;
    let files: Vec<PathBuf> = data.sources.iter().map(|s| PathBuf::from(&s.path)).collect();
    let hash = hash_inputs(&files).context("--route reads each row's teacher from the precomputed data files")?;
    if hash != data.hash {
        bail!(
            "--route: the data files {} changed since they were precomputed (hash {hash}, the sets say {})",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            data.hash
        );
    }
    let values = record_field(&files, &FieldNames::from_recorded(&data.fields), data.skip_invalid, &route.field)?;
    if values.len() as u64 != examples {
        bail!("--route: the data holds {} examples, the sets {examples}", values.len());
    }
    values
        .into_iter()
        .enumerate()
        .map(|(e, v)| match v {
            None => Ok(None),
            Some(v) => match route.names.iter().position(|n| *n == v) {
                Some(t) => Ok(Some(t)),
                None => bail!(
                    "--route: example {e} has {} = {v:?}, which names no teacher (names in set order: {})",
                    route.field,
                    route.names.join(", ")
                ),
            },
        })
        .collect()
}

struct Mixer {
    weights: Vec<f64>,
    sources: SourceMap,
    keep: usize,
    vocab: usize,
    hidden_from: Option<usize>,
}

impl Mixer {
    /// The merged row of one row of every teacher (already checked to be the same row).
    fn mix(&self, rows: &[ShardRow], doc_weights: &[&[f64]]) -> ShardRow {
        let s = &rows[0].sequence;
        let mut position_doc = vec![];
        let mut start = 0;
        for (d, &len) in s.doc_lengths.iter().enumerate() {
            let end = start + len as usize;
            position_doc.extend(s.loss_mask[start..end].iter().filter(|&&m| m).map(|_| d));
            start = end;
        }
        let lists: Vec<Vec<_>> = rows.iter().map(|r| r.topk.per_position().collect()).collect();
        let mut topk = TopKTargets::empty(self.keep);
        for (j, &doc) in position_doc.iter().enumerate() {
            let teachers: Vec<TeacherPosition> = rows
                .iter()
                .zip(&lists)
                .map(|(r, l)| TeacherPosition {
                    ids: l[j].0,
                    logprobs: l[j].1,
                    tail_logmass: r.topk.tail_logmass[j],
                    label_logprob: r.topk.target_logprob[j],
                })
                .collect();
            let m = mix_position(&teachers, doc_weights[doc], self.vocab, self.keep);
            topk.ids.extend(&m.ids);
            topk.logprobs.extend(m.logprobs_f16());
            topk.tail_logmass.push(m.tail_logmass_f32());
            topk.target_logprob.push(m.label_logprob.min(0.0) as f32);
        }
        let hidden = self.hidden_from.map(|h| rows[h].hidden.clone()).unwrap_or_default();
        ShardRow { sequence: s.clone(), topk, hidden }
    }
}

/// A set's rows in order, each with where it is stored (for error messages).
struct RowStream<'a> {
    set: &'a ShardSet,
    next_group: usize,
    buffered: std::collections::VecDeque<(String, ShardRow)>,
}

impl<'a> RowStream<'a> {
    fn new(set: &'a ShardSet) -> Self {
        RowStream { set, next_group: 0, buffered: Default::default() }
    }

    fn fill(&mut self) -> Result<()> {
        while self.buffered.is_empty() && self.next_group < self.set.row_groups().len() {
            let rg = self.set.row_groups()[self.next_group];
            self.next_group += 1;
            let file = self.set.dir.join(&self.set.manifest.shards[rg.shard].file);
            for (i, row) in self.set.decode(rg)?.into_iter().enumerate() {
                self.buffered.push_back((format!("{}, row group {}, row {i}", file.display(), rg.row_group), row));
            }
        }
        Ok(())
    }

    fn next(&mut self) -> Result<Option<(String, ShardRow)>> {
        self.fill()?;
        Ok(self.buffered.pop_front())
    }
}

/// Names the first difference between two rows that should be the same.
fn row_difference(a: &ShardRow, b: &ShardRow) -> Option<String> {
    let (a, b) = (&a.sequence, &b.sequence);
    if a.row_index != b.row_index {
        return Some(format!("row_index {} vs {}", b.row_index, a.row_index));
    }
    if a.sample_ids != b.sample_ids {
        return Some(format!("sample_ids {:?} vs {:?}", b.sample_ids, a.sample_ids));
    }
    if a.doc_lengths != b.doc_lengths {
        return Some(format!("doc_lengths {:?} vs {:?}", b.doc_lengths, a.doc_lengths));
    }
    if let Some(t) = (0..a.ids.len().max(b.ids.len())).find(|&t| a.ids.get(t) != b.ids.get(t)) {
        return Some(format!("input_ids differ at token {t}: {:?} vs {:?}", b.ids.get(t), a.ids.get(t)));
    }
    if let Some(t) = (0..a.loss_mask.len()).find(|&t| a.loss_mask.get(t) != b.loss_mask.get(t)) {
        return Some(format!("loss_mask differs at token {t}"));
    }
    (a.sampler_logprobs != b.sampler_logprobs).then(|| "sampler_logprob differs".into())
}

/// Streams the aligned rows of every set through the mixer into shards.
fn write_mixture(sets: &[ShardSet], mixer: &Mixer, out: &mut RollingShards, manifest: &mut Manifest) -> Result<()> {
    let group_rows = sets[0].manifest.settings.sharding.row_group_rows.max(1);
    let mut streams: Vec<RowStream> = sets.iter().map(RowStream::new).collect();
    loop {
        // One row group's worth of aligned rows, mixed in parallel.
        let mut batch: Vec<Vec<ShardRow>> = vec![];
        while batch.len() < group_rows {
            let Some((at, first)) = streams[0].next()? else { break };
            let mut rows = vec![first];
            for (t, stream) in streams.iter_mut().enumerate().skip(1) {
                let Some((their_at, row)) = stream.next()? else {
                    bail!(
                        "{} ends before {at} (row_index {}): the sets hold different rows",
                        sets[t].dir.display(),
                        rows[0].sequence.row_index
                    );
                };
                if let Some(d) = row_difference(&rows[0], &row) {
                    bail!("{their_at} and {at} should be the same row but differ: {d}");
                }
                rows.push(row);
            }
            batch.push(rows);
        }
        if batch.is_empty() {
            for (t, stream) in streams.iter_mut().enumerate().skip(1) {
                if let Some((at, _)) = stream.next()? {
                    bail!("{at}: {} holds more rows than {}", sets[t].dir.display(), sets[0].dir.display());
                }
            }
            return Ok(());
        }
        let mixed: Vec<ShardRow> = batch
            .par_iter()
            .map(|rows| Ok(mixer.mix(rows, &mixer.sources.row_weights(&rows[0], &mixer.weights)?)))
            .collect::<Result<_>>()?;
        out.write(&mixed, manifest)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::sequence::Sequence;

    #[test]
    fn weights_too_large_to_sum_are_still_scaled() {
        assert_eq!(normalised(&[1e308, 1e308]).unwrap(), [0.5, 0.5]);
        assert_eq!(normalised(&[3.0, 1.0]).unwrap(), [0.75, 0.25]);
        assert!(normalised(&[0.0, 0.0]).is_err());
        assert!(normalised(&[f64::INFINITY, 1.0]).is_err());
    }

    fn row(index: u64, docs: usize) -> ShardRow {
        let sequence = Sequence {
            row_index: index,
            sample_ids: (0..docs).map(|d| format!("doc{d}")).collect(),
            doc_lengths: vec![2; docs],
            ids: vec![5; 2 * docs],
            loss_mask: [false, true].repeat(docs),
            sampler_logprobs: None,
        };
        ShardRow { sequence, topk: TopKTargets::empty(1), hidden: vec![] }
    }

    /// Files of 10 and 10 examples, weights (1, 0) for the first and (0, 1) for the second.
    fn two_files(row_indices: Vec<u64>) -> SourceMap {
        SourceMap {
            starts: vec![0, 10, 20],
            weights: vec![Some(vec![1.0, 0.0]), Some(vec![0.0, 1.0])],
            row_indices,
            slice_ends: vec![(0, 20)],
            routes: vec![],
            one_hot: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        }
    }

    #[test]
    fn each_packed_document_takes_its_files_weights() {
        let global = [0.5, 0.5];
        // Row 8 packs examples 8..12: two from each file.
        let map = two_files(vec![0, 8, 12]);
        let w = map.row_weights(&row(8, 4), &global).unwrap();
        assert_eq!(w, [&[1.0, 0.0][..], &[1.0, 0.0], &[0.0, 1.0], &[0.0, 1.0]]);
        // The last row runs to the end of the data.
        let w = map.row_weights(&row(12, 8), &global).unwrap();
        assert!(w.iter().all(|w| *w == [0.0, 1.0]));
        // Row 8 packs 3 of examples 8..12 (one was skipped as invalid): its second
        // document is example 9 or 10, in either file.
        let e = map.row_weights(&row(8, 3), &global).unwrap_err().to_string();
        assert!(e.contains("row_index 8: document 1 (doc1)") && e.contains("--skip-invalid"), "{e}");
        // Without per-source weights every document takes the global ones.
        let plain = SourceMap { weights: vec![None, None], ..two_files(vec![]) };
        assert_eq!(plain.row_weights(&row(8, 3), &global).unwrap(), vec![&global[..]; 3]);
    }

    #[test]
    fn routes_override_file_weights_per_document() {
        let global = [0.5, 0.5];
        // Examples 8..12 route to teachers 1, none, 0, 0: the unrouted one keeps its
        // file's weights.
        let mut routes = vec![None; 20];
        (routes[8], routes[10], routes[11]) = (Some(1), Some(0), Some(0));
        let map = SourceMap { routes, ..two_files(vec![0, 8, 12]) };
        let w = map.row_weights(&row(8, 4), &global).unwrap();
        assert_eq!(w, [&[0.0, 1.0][..], &[1.0, 0.0], &[1.0, 0.0], &[1.0, 0.0]]);
        // Document 1 of 3 is example 9 or 10, which route differently: refused.
        let e = map.row_weights(&row(8, 3), &global).unwrap_err().to_string();
        assert!(e.contains("route to different teachers"), "{e}");
    }

    #[test]
    fn the_first_difference_between_rows_is_named() {
        let (a, mut b) = (row(3, 2), row(3, 2));
        assert_eq!(row_difference(&a, &b), None);
        b.sequence.ids[3] = 7;
        assert_eq!(row_difference(&a, &b).unwrap(), "input_ids differ at token 3: Some(7) vs Some(5)");
        b.sequence.sample_ids[1] = "other".into();
        assert!(row_difference(&a, &b).unwrap().starts_with("sample_ids"));
        assert!(row_difference(&a, &row(4, 2)).unwrap().starts_with("row_index 4 vs 3"));
    }
}
