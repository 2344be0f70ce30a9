//! `distill score` against a float64 computation of the NLL from transformers' logits.
mod common;
use common::*;
use distill::eval::text::{score_sequences, score_sequences_against, ScoreOptions};
use distill::model::CausalLm;
use distill::tokenizer::MaskedTokens;
use tch::{Device, Kind, Tensor};

/// Sequences of the reference "right" batch, without padding.
fn reference_sequences(reference: &std::collections::HashMap<String, Tensor>) -> Vec<Vec<i64>> {
    let ids = Vec::<Vec<i64>>::try_from(&reference["right.input_ids"]).unwrap();
    let mask = Vec::<Vec<i64>>::try_from(&reference["right.attention_mask"]).unwrap();
    ids.into_iter()
        .zip(mask)
        .map(|(row, m)| row.into_iter().zip(m).filter(|x| x.1 == 1).map(|x| x.0).collect())
        .collect()
}

#[test]
fn nll_matches_transformers_logits_in_float64() {
    let dir = model_dir("llama");
    let reference = read_tensors(&dir.join("reference.safetensors"));
    let seqs = reference_sequences(&reference);
    let logits = reference["right.logits"].to_kind(Kind::Double).log_softmax(-1, Kind::Double);
    let model = CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let inputs: Vec<MaskedTokens> = seqs
        .iter()
        .map(|s| MaskedTokens { ids: s.iter().map(|&x| x as u32).collect(), loss_mask: vec![true; s.len()] })
        .collect();
    // Small batches and chunks exercise the batching and the chunked head.
    let opts = ScoreOptions { max_batch_tokens: 60, max_len: 0, head_chunk: Some(5) };
    let ours = score_sequences(&model, &inputs, &opts).unwrap();
    for (r, seq) in seqs.iter().enumerate() {
        let want: f64 = (1..seq.len()).map(|t| -logits.double_value(&[r as i64, t as i64 - 1, seq[t]])).sum();
        let (n, got) = ours[r];
        assert_eq!(n, seq.len() - 1);
        let rel = (got - want).abs() / want.abs();
        assert!(rel < 1e-5, "row {r}: NLL {got} vs transformers {want} (rel {rel:.2e})");
    }
}

#[test]
fn cli_prints_jsonl_rows_and_a_total() {
    let dir = model_dir("qwen2");
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"id\": \"a\", \"text\": \"It was the best of times, it was the worst of times.\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Call me Ishmael.\"}]}\n",
            "{\"prompt\": \"We hold these truths\", \"response\": \" to be self-evident.\"}\n",
        ),
    )
    .unwrap();
    let (dir, input) = (dir.to_str().unwrap(), input.to_str().unwrap());
    let out = ok(distill(&["score", "--device", "cpu", "--format", "jsonl", "--model", dir, "--input", input]));
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["a", "in:2", "in:3", "ALL"]);
    let tokens: Vec<u64> = rows.iter().map(|r| r["tokens"].as_u64().unwrap()).collect();
    assert_eq!(tokens[3], tokens[..3].iter().sum::<u64>());
    for r in &rows {
        let (nll, ppl) = (r["nll"].as_f64().unwrap(), r["ppl"].as_f64().unwrap());
        assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-6 * ppl, "{r}");
    }
}

/// The full-vocabulary KL and top-1 agreement that `eval --teacher` reports, against the
/// same two models run one sequence at a time (no padding, no chunks) with the softmax
/// and the KL in float64. Tolerance: the batched path takes float32 log-softmaxes of
/// 384 logits; their rounding (~1e-7 relative per term) sums to well under 1e-5 of a
/// row's KL, and batching moves the logits by float32 rounding only.
#[test]
fn full_vocabulary_kl_matches_a_float64_computation() {
    let reference = read_tensors(&model_dir("llama").join("reference.safetensors"));
    let seqs = reference_sequences(&reference);
    let teacher = CausalLm::load(&model_dir("llama"), Device::Cpu, Kind::Float).unwrap();
    let model = CausalLm::load(&model_dir("qwen3"), Device::Cpu, Kind::Float).unwrap();
    let inputs: Vec<MaskedTokens> = seqs
        .iter()
        .map(|s| MaskedTokens { ids: s.iter().map(|&x| x as u32).collect(), loss_mask: vec![true; s.len()] })
        .collect();
    let opts = ScoreOptions { max_batch_tokens: 60, max_len: 0, head_chunk: Some(5) };
    let ours = score_sequences_against(&model, Some(&teacher), &inputs, &opts).unwrap();
    let log_probs = |m: &CausalLm, seq: &[i64]| {
        let ids = Tensor::from_slice(seq).unsqueeze(0);
        m.forward(&ids, None, &[]).unwrap().logits.squeeze_dim(0).to_kind(Kind::Double).log_softmax(-1, Kind::Double)
    };
    for (r, seq) in seqs.iter().enumerate() {
        let n = seq.len() as i64 - 1;
        let (logq, logp) = (log_probs(&teacher, seq).narrow(0, 0, n), log_probs(&model, seq).narrow(0, 0, n));
        let kl = (logq.exp() * (&logq - &logp)).sum(Kind::Double).double_value(&[]);
        let agree = logq.argmax(-1, false).eq_tensor(&logp.argmax(-1, false)).sum(Kind::Double).double_value(&[]);
        let got = ours[r];
        assert_eq!(got.tokens, n as usize);
        let rel = (got.kl - kl).abs() / kl;
        assert!(rel < 1e-5, "row {r}: KL {} vs float64 {kl} (rel {rel:.2e})", got.kl);
        assert_eq!(got.agree, agree, "row {r}: top-1 agreements");
        // Without a teacher the NLL is the same and the KL is not measured.
        assert_eq!(score_sequences(&model, &inputs, &opts).unwrap()[r], (got.tokens, got.nll));
    }
    // The teacher against itself: no divergence, full agreement.
    for s in score_sequences_against(&teacher, Some(&teacher), &inputs, &opts).unwrap() {
        assert!(s.kl.abs() < 1e-6 * s.tokens as f64 && s.agree == s.tokens as f64, "{s:?}");
    }
}
