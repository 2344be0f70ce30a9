//! Judging a model by what it writes: greedy replies to held-out prompts, exact-match
//! accuracy against the rows' reference answers (a trailing assistant turn, or
//! `response`), reply length, and how plausible a teacher finds the replies (its mean NLL
//! per reply token, the reply scored after the same prompt tokens).
use anyhow::Result;
use serde::Serialize;

use crate::generate::prompts::PromptRow;
use crate::generate::{generate, FinishReason, GenerateOptions, Hooks, SamplingOptions};
use crate::model::CausalLm;
use crate::tokenizer::{MaskedTokens, TextTokenizer};

use super::text::{score_sequences_against, ScoreOptions, TokenSums};

#[derive(Debug, Clone, Serialize)]
pub struct GenerationMetrics {
    pub prompts: usize,
    /// Share of the rows with a reference whose reply equals it (see `same_answer`).
    pub exact_match: Option<f64>,
    pub with_reference: usize,
    pub mean_new_tokens: f64,
    /// Share of replies that ended at an eos id (not at the length limit).
    pub stopped: f64,
    /// The teacher's mean negative log-likelihood per reply token (nats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_nll: Option<f64>,
    /// The mean KL from the teacher to the model over the whole vocabulary at the
    /// positions of the model's own replies (nats per token): how closely it imitates
    /// the teacher where it actually goes, the quantity on-policy KD trains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_on_replies: Option<f64>,
}

/// Replies (text) of one model to every prompt, in order.
pub struct Replies {
    pub texts: Vec<String>,
    pub metrics: GenerationMetrics,
}

/// Greedy replies of `model` to `rows` (tokenised with its tokenizer and template),
/// at most `max_new_tokens` each, stopping at `stop_ids`.
pub fn judge_replies(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    rows: &[PromptRow],
    stop_ids: &[u32],
    max_new_tokens: usize,
    teacher: Option<&CausalLm>,
) -> Result<Replies> {
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    let keys: Vec<u64> = (0..rows.len() as u64).collect();
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: stop_ids.to_vec(),
        sampling: SamplingOptions::default(),
        max_batch_tokens: 16384,
        max_batch_rows: 64,
    };
    let replies = generate(model, &prompts, &keys, &opts, &Hooks::default())?;
    let texts = replies.iter().map(|r| tokenizer.decode(&r.ids, true)).collect::<Result<Vec<_>>>()?;
    let with_reference = rows.iter().filter(|r| r.reference.is_some()).count();
    let correct = rows
        .iter()
        .zip(&texts)
        .filter(|(r, t)| r.reference.as_deref().is_some_and(|reference| same_answer(t, reference)))
        .count();
    let n = rows.len().max(1) as f64;
    let (teacher_nll, kl_on_replies) = match teacher {
        None => (None, None),
        Some(t) => {
            // The reply as the teacher would read it: prompt tokens unscored, reply scored
            // (its eos included: ending there is part of the answer).
            let seqs: Vec<MaskedTokens> = rows
                .iter()
                .zip(&replies)
                .map(|(row, reply)| MaskedTokens {
                    ids: [row.ids.as_slice(), reply.ids.as_slice()].concat(),
                    loss_mask: [vec![false; row.ids.len()], vec![true; reply.ids.len()]].concat(),
                })
                .collect();
            // One pass of both models: the teacher's NLL and its KL to the model.
            let sums = score_sequences_against(model, Some(t), &seqs, &ScoreOptions::default())?;
            let tokens = sums.iter().map(|s| s.tokens).sum::<usize>().max(1) as f64;
            let total = |f: fn(&TokenSums) -> f64| sums.iter().map(f).sum::<f64>() / tokens;
            (Some(total(|s| s.teacher_nll)), Some(total(|s| s.kl)))
        }
    };
    let metrics = GenerationMetrics {
        prompts: rows.len(),
        exact_match: (with_reference > 0).then(|| correct as f64 / with_reference as f64),
        with_reference,
        mean_new_tokens: replies.iter().map(|r| r.ids.len()).sum::<usize>() as f64 / n,
        stopped: replies.iter().filter(|r| r.finish == FinishReason::Stop).count() as f64 / n,
        teacher_nll,
        kl_on_replies,
    };
    Ok(Replies { texts, metrics })
}

/// Whether a reply gives the reference answer: equal after trimming, collapsing runs of
/// whitespace and dropping one final period on either side.
pub fn same_answer(reply: &str, reference: &str) -> bool {
    let norm = |s: &str| {
        let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
        s.strip_suffix('.').map(str::to_string).unwrap_or(s)
    };
    norm(reply) == norm(reference)
}

#[cfg(test)]
mod tests {
    use super::same_answer;

    #[test]
    fn answers_match_after_whitespace_and_a_final_period() {
        assert!(same_answer(" 1, -3, -107\n", "1, -3, -107"));
        assert!(same_answer("42.", "42"));
        assert!(same_answer("a  b", "a b"));
        assert!(!same_answer("-107, -3, 1", "1, -3, -107"));
        assert!(!same_answer("42", "4.2"));
    }
}
