//! What servers return when they score a prompt, read into one shape (`ServedDoc`).
//!
//! - vLLM, OpenAI-compatible `/v1/completions` or `/v1/chat/completions` with
//!   `prompt_logprobs: k`: `prompt_logprobs` (in the choice, or at the top level for
//!   chat) is a list with one entry per prompt token, `null` for the first, else a map
//!   from token id (a JSON string) to `{"logprob", "rank", "decoded_token"}`. The map
//!   holds the top k by rank plus the prompt token itself when its rank is above k. The
//!   ids scored come from `prompt_token_ids` (`return_token_ids: true`) or, when the
//!   client sent ids, from the request.
//! - OpenAI legacy `echo: true, logprobs: k` (vLLM answers it too): `logprobs.tokens`,
//!   `token_logprobs` and `top_logprobs` (maps keyed by token strings). Only usable with
//!   `return_tokens_as_token_ids: true`, where each token is written `token_id:N`.
//! - SGLang `/generate` with `return_logprob: true, logprob_start_len: 0,
//!   top_logprobs_num: k`: `meta_info.input_token_logprobs` is `[logprob, id, text]` per
//!   prompt token (`null` log-prob for the first) and `meta_info.input_top_logprobs` a
//!   list of `[logprob, id, text]` lists (`null` for the first).
//!
//! vLLM's `flat_logprobs` changes how the server holds them, not the JSON it writes.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One document's prompt scoring: the ids the server scored and, for each token after
/// the first, the server's list of most likely ids at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedDoc {
    pub format: &'static str,
    pub ids: Vec<u32>,
    /// `positions[j - 1]` is the distribution that predicted `ids[j]`.
    pub positions: Vec<ServedPosition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServedPosition {
    /// The server's top list, descending by log-probability (the prompt token not
    /// included unless it ranks among them).
    pub top: Vec<(u32, f64)>,
    /// The log-probability of the token that follows (the label).
    pub label: f64,
}

/// Reads one server response; `request_ids` are the ids the client sent, when it sent
/// ids (used where the response does not repeat them).
pub fn parse_response(response: &Value, request_ids: Option<&[u32]>) -> Result<ServedDoc> {
    if let Some(meta) = response.get("meta_info") {
        return sglang(meta);
    }
    let choice = response.get("choices").and_then(|c| c.get(0));
    let field = |name: &str| choice.and_then(|c| c.get(name)).or_else(|| response.get(name)).filter(|v| !v.is_null());
    if let Some(prompt_logprobs) = field("prompt_logprobs") {
        let ids = match field("prompt_token_ids") {
            Some(v) => id_list(v).context("prompt_token_ids")?,
            None => request_ids
                .map(<[u32]>::to_vec)
                .ok_or_else(|| anyhow!("no prompt_token_ids: ask with `return_token_ids: true` or send token ids"))?,
        };
        return vllm_prompt_logprobs(prompt_logprobs, ids);
    }
    if let Some(logprobs) = field("logprobs") {
        let prompt_tokens = response.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
        return echo_logprobs(logprobs, prompt_tokens);
    }
    bail!("neither vLLM's `prompt_logprobs`, OpenAI's echoed `logprobs` nor SGLang's `meta_info` is in the response")
}

fn vllm_prompt_logprobs(list: &Value, ids: Vec<u32>) -> Result<ServedDoc> {
    let entries = list.as_array().ok_or_else(|| anyhow!("prompt_logprobs is not a list"))?;
    if entries.len() != ids.len() {
        bail!("prompt_logprobs has {} entries for {} prompt tokens (a truncated response?)", entries.len(), ids.len());
    }
    let mut positions = Vec::with_capacity(ids.len().saturating_sub(1));
    for (j, entry) in entries.iter().enumerate().skip(1) {
        let map = entry.as_object().ok_or_else(|| anyhow!("prompt_logprobs[{j}] is not a map of token ids"))?;
        let mut listed = Vec::with_capacity(map.len());
        let mut label = None;
        for (key, value) in map {
            let id = token_id(key).with_context(|| format!("prompt_logprobs[{j}]"))?;
            let logprob = number(value.get("logprob").unwrap_or(value))
                .with_context(|| format!("prompt_logprobs[{j}][{key}]"))?;
            let rank = value.get("rank").and_then(Value::as_u64);
            if id == ids[j] {
                label = Some((logprob, rank));
            }
            listed.push((id, logprob, rank));
        }
        let (label, label_rank) =
            label.ok_or_else(|| anyhow!("prompt_logprobs[{j}] does not list the prompt token {}", ids[j]))?;
        // The prompt token is listed whatever its rank. With n entries, a rank up to n
        // leaves no unlisted id above it, so the n entries are the top n; a rank above
        // n means the others are the top list. Without ranks: above the others' lowest.
        let others_lowest = listed.iter().filter(|e| e.0 != ids[j]).map(|e| e.1).fold(f64::INFINITY, f64::min);
        let label_in_top = match label_rank {
            Some(r) => r <= listed.len() as u64,
            None => label > others_lowest,
        };
        let top = listed.into_iter().filter(|e| e.0 != ids[j] || label_in_top).map(|e| (e.0, e.1)).collect();
        positions.push(ServedPosition { top: descending(top), label });
    }
    Ok(ServedDoc { format: "vllm prompt_logprobs", ids, positions })
}

fn echo_logprobs(logprobs: &Value, prompt_tokens: Option<u64>) -> Result<ServedDoc> {
    let get =
        |name: &str| logprobs.get(name).and_then(Value::as_array).ok_or_else(|| anyhow!("logprobs.{name} is missing"));
    let (tokens, token_logprobs, tops) = (get("tokens")?, get("token_logprobs")?, get("top_logprobs")?);
    let n = prompt_tokens.ok_or_else(|| anyhow!("usage.prompt_tokens is missing: the prompt's length is unknown"))?
        as usize;
    if tokens.len() < n || token_logprobs.len() < n || tops.len() < n {
        bail!(
            "logprobs list {} tokens for a {n}-token prompt (a truncated response, or asked without `echo`?)",
            tokens.len()
        );
    }
    let ids = tokens[..n]
        .iter()
        .map(|t| t.as_str().ok_or_else(|| anyhow!("logprobs.tokens holds a non-string")).and_then(token_id))
        .collect::<Result<Vec<u32>>>()
        .context("logprobs.tokens (ask with `return_tokens_as_token_ids: true`: token strings do not name ids)")?;
    let mut positions = Vec::with_capacity(n.saturating_sub(1));
    for j in 1..n {
        let label = number(&token_logprobs[j]).with_context(|| format!("logprobs.token_logprobs[{j}]"))?;
        let map = tops[j].as_object().ok_or_else(|| anyhow!("logprobs.top_logprobs[{j}] is not a map"))?;
        let top = map
            .iter()
            .map(|(k, v)| Ok((token_id(k)?, number(v)?)))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("logprobs.top_logprobs[{j}]"))?;
        positions.push(ServedPosition { top: descending(top), label });
    }
    Ok(ServedDoc { format: "openai echo logprobs", ids, positions })
}

fn sglang(meta: &Value) -> Result<ServedDoc> {
    let get = |name: &str| {
        meta.get(name).and_then(Value::as_array).ok_or_else(|| {
            anyhow!("meta_info.{name} is missing (ask with return_logprob, logprob_start_len 0 and top_logprobs_num)")
        })
    };
    let (tokens, tops) = (get("input_token_logprobs")?, get("input_top_logprobs")?);
    if tops.len() != tokens.len() {
        bail!("meta_info lists {} input tokens but {} top lists (a truncated response?)", tokens.len(), tops.len());
    }
    if let Some(n) = meta.get("prompt_tokens").and_then(Value::as_u64) {
        if n as usize != tokens.len() {
            bail!("meta_info.input_token_logprobs has {} entries for {n} prompt tokens (logprob_start_len must be 0; or a truncated response)", tokens.len());
        }
    }
    let triple = |v: &Value, what: String| -> Result<(Option<f64>, u32)> {
        let t = v.as_array().filter(|t| t.len() >= 2).ok_or_else(|| anyhow!("{what} is not [logprob, id, text]"))?;
        let lp = if t[0].is_null() { None } else { Some(number(&t[0]).with_context(|| what.clone())?) };
        let id =
            t[1].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| anyhow!("{what}: id is not a token id"))?;
        Ok((lp, id))
    };
    let mut ids = Vec::with_capacity(tokens.len());
    let mut positions = Vec::with_capacity(tokens.len().saturating_sub(1));
    for (j, (token, top)) in tokens.iter().zip(tops).enumerate() {
        let (label, id) = triple(token, format!("meta_info.input_token_logprobs[{j}]"))?;
        ids.push(id);
        if j == 0 {
            continue;
        }
        let label = label.ok_or_else(|| anyhow!("meta_info.input_token_logprobs[{j}] has no log-prob"))?;
        let list = top.as_array().ok_or_else(|| anyhow!("meta_info.input_top_logprobs[{j}] is not a list"))?;
        let top = list
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (lp, id) = triple(e, format!("meta_info.input_top_logprobs[{j}][{i}]"))?;
                Ok((id, lp.ok_or_else(|| anyhow!("meta_info.input_top_logprobs[{j}][{i}] has no log-prob"))?))
            })
            .collect::<Result<Vec<_>>>()?;
        positions.push(ServedPosition { top: descending(top), label });
    }
    Ok(ServedDoc { format: "sglang input_top_logprobs", ids, positions })
}

/// A token id written as `123` or vLLM's `token_id:123`.
fn token_id(key: &str) -> Result<u32> {
    let digits = key.strip_prefix("token_id:").unwrap_or(key);
    digits.parse().map_err(|_| anyhow!("`{key}` is not a token id"))
}

fn id_list(v: &Value) -> Result<Vec<u32>> {
    let list = v.as_array().ok_or_else(|| anyhow!("not a list"))?;
    list.iter()
        .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| anyhow!("`{x}` is not a token id")))
        .collect()
}

/// A log-probability: a number, or the strings JSON writers use for -inf and NaN.
fn number(v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| anyhow!("`{n}` is not a number")),
        Value::String(s) if s == "-Infinity" || s == "-inf" => Ok(f64::NEG_INFINITY),
        _ => bail!("`{v}` is not a log-probability"),
    }
}

fn descending(mut top: Vec<(u32, f64)>) -> Vec<(u32, f64)> {
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vllm_label_outside_the_top_is_not_listed_as_top() {
        let r = json!({"choices": [{"prompt_token_ids": [5, 7, 9], "prompt_logprobs": [null,
            {"7": {"logprob": -0.5, "rank": 1}, "3": {"logprob": -1.5, "rank": 2}},
            {"9": {"logprob": -4.0, "rank": 6}, "1": {"logprob": -0.2, "rank": 1}, "2": {"logprob": -2.0, "rank": 2}}]}]});
        let doc = parse_response(&r, None).unwrap();
        assert_eq!(doc.ids, vec![5, 7, 9]);
        assert_eq!(doc.positions[0].top, vec![(7, -0.5), (3, -1.5)]);
        assert_eq!(doc.positions[0].label, -0.5);
        assert_eq!(doc.positions[1].top, vec![(1, -0.2), (2, -2.0)]);
        assert_eq!(doc.positions[1].label, -4.0);
    }

    #[test]
    fn sglang_and_echo_read_the_same_position() {
        let sg = json!({"text": "", "meta_info": {"prompt_tokens": 2,
            "input_token_logprobs": [[null, 5, null], [-0.7, 8, null]],
            "input_top_logprobs": [null, [[-0.3, 2, null], [-0.7, 8, null]]]}});
        let echo = json!({"usage": {"prompt_tokens": 2}, "choices": [{"logprobs": {
            "tokens": ["token_id:5", "token_id:8", "token_id:4"], "token_logprobs": [null, -0.7, -1.0],
            "top_logprobs": [null, {"token_id:2": -0.3, "token_id:8": -0.7}, {"token_id:4": -1.0}]}}]});
        let (a, b) = (parse_response(&sg, None).unwrap(), parse_response(&echo, None).unwrap());
        assert_eq!((a.ids.clone(), a.positions.clone()), (b.ids, b.positions));
        assert_eq!(a.positions[0].top, vec![(2, -0.3), (8, -0.7)]);
    }

    #[test]
    fn refuses_what_cannot_be_read() {
        let short =
            json!({"choices": [{"prompt_token_ids": [5, 7, 9], "prompt_logprobs": [null, {"7": {"logprob": -0.5}}]}]});
        assert!(parse_response(&short, None).unwrap_err().to_string().contains("truncated"));
        let strings = json!({"usage": {"prompt_tokens": 2}, "choices": [{"logprobs": {
            "tokens": ["Hel", "lo"], "token_logprobs": [null, -0.1], "top_logprobs": [null, {"lo": -0.1}]}}]});
        assert!(format!("{:#}", parse_response(&strings, None).unwrap_err()).contains("return_tokens_as_token_ids"));
        let no_ids = json!({"choices": [{"prompt_logprobs": [null]}]});
        assert!(parse_response(&no_ids, None).unwrap_err().to_string().contains("return_token_ids"));
        assert!(parse_response(&no_ids, Some(&[3])).is_ok());
    }
}
