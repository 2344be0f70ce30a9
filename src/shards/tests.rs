//! The write -> read round trip of `ShardRow`s through a real shard set.
use half::f16;

use super::manifest::*;
use super::reader::ShardSet;
use super::row::{HiddenTargets, ShardRow, TailDraws, TopKTargets};
use super::schema::{IdType, ShardLayout};
use super::writer::{ParquetOptions, ShardWriter};
use crate::dataset::sequence::Sequence;

fn settings(layout: &ShardLayout) -> Settings {
    Settings {
        teacher: TeacherInfo {
            path: "teacher".into(),
            config_hash: "xxh3:0".into(),
            architecture: "LlamaForCausalLM".into(),
            num_layers: 4,
            hidden_size: layout.hidden.first().map_or(5, |h| h.1),
            model_vocab_size: 70_000,
            dtype: "float32".into(),
        },
        tokenizer: TokenizerInfo { hash: "xxh3:1".into(), vocab_size: 70_000, chat_template_hash: None },
        capture: CaptureInfo {
            top_k: layout.top_k,
            top_p: layout.adaptive.then_some(0.9),
            min_k: 0,
            id_type: layout.id_type,
            logprob_dtype: "float16".into(),
            tail: "tail".into(),
            hidden_layers: layout.hidden.iter().map(|h| h.0).collect(),
            hidden_dtype: "float16".into(),
            draws: layout.draws.then(|| DrawInfo { per_position: DRAWS, seed: 1, from: "tail".into() }),
            sampler_logprobs: layout.sampler_logprobs,
            cross_tokenizer: None,
            served: None,
        },
        data: DataInfo {
            sources: vec![],
            hash: "xxh3:2".into(),
            fields: serde_json::json!({}),
            max_len: 64,
            packing: true,
            train_on_all_tokens: false,
            skip_invalid: false,
        },
        sharding: ShardingInfo { shard_tokens: 100, zstd_level: 3, row_group_rows: 2, byte_stream_split: true },
        mixture: None,
    }
}

/// A row of `docs` documents with varied ids, masks and targets (ids up to `max_id`).
fn row(index: u64, docs: &[u32], layout: &ShardLayout, max_id: u32) -> ShardRow {
    let mut sequence: Option<Sequence> = None;
    for (d, &n) in docs.iter().enumerate() {
        let doc = Sequence {
            row_index: index,
            sample_ids: vec![format!("doc-{index}-{d}")],
            doc_lengths: vec![n],
            ids: (0..n).map(|t| (index as u32 * 7919 + t * 104_729) % max_id).collect(),
            loss_mask: (0..n).map(|t| t > 0 && !(t + d as u32).is_multiple_of(3)).collect(),
            sampler_logprobs: None,
        };
        let targets = doc.num_targets();
        let doc = Sequence {
            // Sampled rows, fixed rows (null) and rows packing both (index % 3 == 1: fixed
            // alone; document 1 of the others: fixed, packed with sampled ones).
            sampler_logprobs: (layout.sampler_logprobs && index % 3 != 1 && d != 1)
                .then(|| (0..targets).map(|i| -0.125 * i as f32).collect()),
            ..doc
        };
        match sequence.as_mut() {
            Some(s) => s.append(doc),
            None => sequence = Some(doc),
        }
    }
    let sequence = sequence.unwrap();
    let p = sequence.num_targets();
    let k = layout.top_k;
    let value = |i: usize| (i as f32 * 0.37).sin();
    // Mass-adaptive: 1..=k ids per position.
    let lengths: Option<Vec<u32>> = layout.adaptive.then(|| (0..p).map(|i| 1 + (i % k) as u32).collect());
    let n = lengths.as_ref().map_or(p * k, |l| l.iter().sum::<u32>() as usize);
    // A distribution at each position: the listed ids hold mass M (1 at every fifth
    // position, no tail), halving from one to the next; the tail holds 1 - M.
    let listed_mass = |j: usize| match (k, j % 5) {
        (0, _) => 0.0, // draws alone: all of it is tail
        (_, 4) => 1.0,
        _ => 0.5 + 0.4 * value(j).abs() as f64,
    };
    let mut logprobs = vec![];
    for j in 0..p {
        let m = lengths.as_ref().map_or(k, |l| l[j] as usize);
        let norm: f64 = (0..m).map(|x| 0.5f64.powi(x as i32)).sum();
        logprobs.extend((0..m).map(|x| f16::from_f64((listed_mass(j) * 0.5f64.powi(x as i32) / norm).ln())));
    }
    let topk = TopKTargets {
        k,
        lengths,
        ids: (0..n).map(|i| (i as u32 * 31 + index as u32) % max_id).collect(),
        logprobs,
        tail_logmass: (0..p).map(|j| (1.0 - listed_mass(j)).ln() as f32).collect(),
        target_logprob: (0..p).map(|i| -1.5 - value(i)).collect(),
        draws: layout.draws.then(|| draws(p, max_id)),
        uld: None,
    };
    let hidden = layout
        .hidden
        .iter()
        .map(|&(layer, width)| HiddenTargets {
            layer,
            width,
            values: (0..p * width).map(|i| f16::from_f32(value(i + layer))).collect(),
            rms: (0..p).map(|i| 1.0 + i as f32).collect(),
        })
        .collect();
    ShardRow { sequence, topk, hidden }
}

const DRAWS: usize = 5;

/// 1 to 3 distinct ids per position near the top of the id range (above any top-k id),
/// counts summing to `DRAWS`.
fn draws(positions: usize, max_id: u32) -> TailDraws {
    let mut d = TailDraws::default();
    for i in 0..positions {
        let (ids, counts): (&[u32], &[u8]) = match i % 3 {
            0 => (&[3], &[5]),
            1 => (&[1, 8], &[4, 1]),
            _ => (&[0, 2, 9], &[1, 2, 2]),
        };
        d.lengths.push(ids.len() as u32);
        d.ids.extend(ids.iter().map(|&x| max_id - 10 + x));
        d.counts.extend_from_slice(counts);
    }
    d
}

fn round_trip(layout: ShardLayout, max_id: u32) {
    let dir = tempfile::tempdir().unwrap();
    // Rows of one, two and three documents (packed), of varied lengths.
    let docs = |i: usize| [[9, 6, 3], [4, 6, 3]][i % 2][..1 + i % 3].to_vec();
    let rows: Vec<ShardRow> = (0..5).map(|i| row(i as u64, &docs(i), &layout, max_id)).collect();
    let opts = ParquetOptions { zstd_level: 3, row_group_rows: 2, byte_stream_split: true };
    let mut manifest = Manifest::new(settings(&layout), Slice { index: 0, count: 1 }, 2, SkipReport::default());
    for (shard, part) in [&rows[..3], &rows[3..]].into_iter().enumerate() {
        let mut writer = ShardWriter::create(dir.path(), shard, layout.clone(), &opts, "{}").unwrap();
        writer.write(part).unwrap();
        manifest.shards.push(writer.finish().unwrap());
    }
    manifest.complete = true;
    manifest.save(dir.path()).unwrap();
    let set = ShardSet::open(dir.path(), false).unwrap();
    let read: Vec<ShardRow> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
    assert_eq!(read, rows);
    assert_eq!(manifest.shards[0].rows, 3);
    assert_eq!(manifest.shards[1].targets, rows[3..].iter().map(ShardRow::num_targets).sum::<usize>());
    assert_eq!(set.row_groups().len(), 3, "row groups of 2 rows: 2 + 1");
}

#[test]
fn rows_read_back_as_written() {
    round_trip(
        ShardLayout {
            top_k: 3,
            draws: false,
            adaptive: false,
            sampler_logprobs: false,
            id_type: IdType::Uint16,
            hidden: vec![(1, 4), (3, 4)],
            uld: false,
        },
        65_000,
    );
    round_trip(
        ShardLayout {
            top_k: 2,
            draws: false,
            adaptive: false,
            sampler_logprobs: false,
            id_type: IdType::Int32,
            hidden: vec![],
            uld: false,
        },
        70_000,
    );
}

#[test]
fn rows_with_draws_read_back_as_written() {
    round_trip(
        ShardLayout {
            top_k: 3,
            draws: true,
            adaptive: false,
            sampler_logprobs: false,
            id_type: IdType::Uint16,
            hidden: vec![(2, 4)],
            uld: false,
        },
        65_000,
    );
    // Draws alone (format version 2 without top-k columns).
    round_trip(
        ShardLayout {
            top_k: 0,
            draws: true,
            adaptive: false,
            sampler_logprobs: false,
            id_type: IdType::Int32,
            hidden: vec![],
            uld: false,
        },
        70_000,
    );
    // Mass-adaptive top-k, with and without draws.
    round_trip(
        ShardLayout {
            top_k: 4,
            draws: false,
            adaptive: true,
            sampler_logprobs: false,
            id_type: IdType::Uint16,
            hidden: vec![],
            uld: false,
        },
        65_000,
    );
    round_trip(
        ShardLayout {
            top_k: 3,
            draws: true,
            adaptive: true,
            sampler_logprobs: false,
            id_type: IdType::Int32,
            hidden: vec![(1, 4)],
            uld: false,
        },
        70_000,
    );
    // Sampled rows with their sampler's log-probabilities (packed: they follow the targets).
    round_trip(
        ShardLayout {
            top_k: 3,
            draws: true,
            adaptive: false,
            sampler_logprobs: true,
            id_type: IdType::Uint16,
            hidden: vec![],
            uld: false,
        },
        65_000,
    );
}
