//! The shard reader and the row stream over shards written by `distill precompute` on a
//! tiny model: decoded values equal what pyarrow reads, bad sets are refused by name,
//! and the stream covers each epoch once and restarts exactly after any row. The typed
//! write -> read round trip is a unit test in src/shards/tests.rs.
mod common;
use common::*;

#[test]
fn shard_reader_decodes_what_pyarrow_reads_and_refuses_bad_sets() {
    use distill::shards::reader::ShardSet;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "8", "--hidden-layers", "2", "--row-group-rows", "4"]));
    let set = ShardSet::open(&out, false).unwrap();
    assert!(set.row_groups().len() >= 3, "13 rows in row groups of 4");
    let rows: Vec<_> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
    assert_eq!(rows.len(), 13);
    for r in &rows {
        let targets = r.sequence.loss_mask.iter().filter(|&&m| m).count();
        assert_eq!(r.topk.tail_logmass.len(), targets);
        assert_eq!(r.topk.ids.len(), 8 * targets);
        assert_eq!(r.hidden[0].values.len(), 64 * targets);
    }
    // The same values as pyarrow reads, for one row.
    let dump = tmp.path().join("row.json");
    python_ok(
        "import sys, json, pyarrow.parquet as pq\n\
         r = pq.read_table(sys.argv[1]).to_pylist()[2]\n\
         json.dump({k: r[k] for k in ['row_index', 'topk_ids', 'topk_logprobs', 'tail_logmass', 'hidden_2']}, open(sys.argv[2], 'w'))",
        &[&out.join("shard-00000.parquet"), &dump],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let row = rows.iter().find(|r| r.sequence.row_index == want["row_index"].as_u64().unwrap()).unwrap();
    let flat_f = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| x.as_array().unwrap().iter().map(|y| y.as_f64().unwrap() as f32))
            .collect()
    };
    let ids: Vec<u32> = want["topk_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| x.as_array().unwrap().iter().map(|y| y.as_u64().unwrap() as u32))
        .collect();
    assert_eq!(row.topk.ids, ids);
    assert_eq!(row.topk.logprobs.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), flat_f(&want["topk_logprobs"]));
    assert_eq!(row.hidden[0].values.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), flat_f(&want["hidden_2"]));
    let tail: Vec<f32> = want["tail_logmass"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(row.topk.tail_logmass, tail);

    // The student's tokenizer must be the teacher's.
    let hash = set.manifest.settings.tokenizer.hash.clone();
    set.check_student(&hash, 384, false).unwrap();
    let e = set.check_student("xxh3:0000000000000000", 384, false).unwrap_err().to_string();
    assert!(e.contains(&hash) && e.contains("xxh3:0000000000000000") && e.contains("manifest.json"), "{e}");
    let e = set.check_student(&hash, 300, false).unwrap_err().to_string();
    assert!(e.contains("384") && e.contains("300"), "{e}");
    // Forcing accepts another tokenizer file, never ids beyond the student's embedding.
    set.check_student("xxh3:0000000000000000", 384, true).unwrap();
    let e = set.check_student(&hash, 300, true).unwrap_err().to_string();
    assert!(e.contains("384") && e.contains("300") && e.contains("--force-tokenizer"), "{e}");

    // A corrupt shard is refused by name.
    let shard = out.join("shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let e = format!("{:#}", ShardSet::open(&out, false).err().unwrap());
    assert!(e.contains("shard-00000.parquet") && e.contains("checksum"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    let e = format!("{:#}", ShardSet::open(&out, false).err().unwrap());
    assert!(e.contains("shard-00000.parquet") && e.contains("missing"), "{e}");
    let e = format!("{:#}", ShardSet::open(tmp.path(), false).err().unwrap());
    assert!(e.contains("not a distill shard set"), "{e}");
}

#[test]
fn row_stream_covers_each_epoch_once_and_restarts_exactly() {
    use distill::batch::stream::{RowStream, StreamOptions, StreamPosition};
    use distill::shards::reader::ShardSet;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &out, &["--top-k", "4", "--row-group-rows", "2", "--shard-tokens", "700"]));
    let set = std::sync::Arc::new(ShardSet::open(&out, false).unwrap());
    let opts = StreamOptions { seed: 11, window: 3, prefetch: 2, epochs: Some(2), shuffle: true };
    let all: Vec<(u64, StreamPosition)> = {
        let mut s = RowStream::new(set.clone(), opts, StreamPosition::default());
        let mut v = vec![];
        while let Some(row) = s.next() {
            v.push((row.unwrap().sequence.row_index, s.position()));
        }
        v
    };
    assert_eq!(all.len(), 26);
    for epoch in all.chunks(13) {
        let mut ids: Vec<u64> = epoch.iter().map(|x| x.0).collect();
        ids.sort();
        assert_eq!(ids, (0..13).collect::<Vec<u64>>());
    }
    assert_ne!(all[..13].iter().map(|x| x.0).collect::<Vec<_>>(), all[13..].iter().map(|x| x.0).collect::<Vec<_>>());
    // Resume after any row: the rest is the same sequence.
    for cut in [1, 5, 12, 13, 20] {
        let resumed: Vec<u64> =
            RowStream::new(set.clone(), opts, all[cut - 1].1).map(|r| r.unwrap().sequence.row_index).collect();
        let want: Vec<u64> = all[cut..].iter().map(|x| x.0).collect();
        assert_eq!(resumed, want, "resume after row {cut}");
    }
}
