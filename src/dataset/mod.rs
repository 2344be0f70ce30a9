//! Examples in the shapes users have (plain `text`, `prompt` + `response`, chat
//! `messages`) read from JSONL, and their tokenisation with a loss mask: every token
//! for plain text, only the response / assistant tokens otherwise.
pub mod read;
pub mod sequence;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::tokenizer::{MaskedTokens, TextTokenizer};

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String),
    PromptResponse {
        prompt: String,
        response: String,
    },
    Chat(Vec<Json>),
    /// Token ids given by the row (a reply `distill generate --with-ids` wrote): the
    /// teacher sees exactly the tokens that were sampled, with no re-tokenisation that
    /// could split them differently. Only the response is trained.
    /// `logprobs`: the sampling model's log-probability of each response token.
    /// `tokenizer`: the vocabulary fingerprint of the tokenizer the ids are in
    /// (`TextTokenizer::vocab_fingerprint`); a model reads them only if it is its own.
    Tokens {
        prompt: Vec<u32>,
        response: Vec<u32>,
        logprobs: Option<Vec<f32>>,
        tokenizer: Option<String>,
    },
}

/// Which JSON fields hold each shape.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub text: String,
    pub prompt: String,
    pub response: String,
    pub messages: String,
    /// Read token ids from these fields instead of text; a row with neither field is
    /// read as text (fixed data mixed into an on-policy round).
    pub token_ids: Option<TokenIdFields>,
}

/// The fields of pre-tokenised rows: prompt ids (not trained) and response ids.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenIdFields {
    pub prompt: String,
    pub response: String,
    /// Optional: the sampler's log-probability of each response token.
    pub logprobs: String,
    /// The vocabulary fingerprint of the tokenizer the ids are in (required: ids are
    /// only numbers, and another tokenizer's would be read as wrong tokens).
    pub tokenizer: String,
}

impl Default for TokenIdFields {
    fn default() -> Self {
        TokenIdFields {
            prompt: "prompt_ids".into(),
            response: "response_ids".into(),
            logprobs: "response_logprobs".into(),
            tokenizer: "ids_tokenizer".into(),
        }
    }
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            prompt: "prompt".into(),
            response: "response".into(),
            messages: "messages".into(),
            token_ids: None,
        }
    }
}

impl FieldNames {
    /// As a shard set's manifest records them (`settings.data.fields`); `token_ids`
    /// only when used, so that shard sets made before keep their settings.
    pub fn recorded(&self) -> Json {
        let mut f = serde_json::json!({
            "text": self.text, "prompt": self.prompt, "response": self.response, "messages": self.messages,
        });
        if let Some(ids) = &self.token_ids {
            f["token_ids"] = serde_json::json!([ids.prompt, ids.response]);
        }
        f
    }

    /// The names `recorded` wrote (defaults for any missing).
    pub fn from_recorded(f: &Json) -> Self {
        let get = |k: &str| f.get(k).and_then(Json::as_str).map(String::from);
        let d = FieldNames::default();
        let token_ids = match f.get("token_ids").and_then(Json::as_array).map(Vec::as_slice) {
            Some([prompt, response]) => Some(TokenIdFields {
                prompt: prompt.as_str().unwrap_or_default().into(),
                response: response.as_str().unwrap_or_default().into(),
                ..TokenIdFields::default()
            }),
            _ => None,
        };
        FieldNames {
            text: get("text").unwrap_or(d.text),
            prompt: get("prompt").unwrap_or(d.prompt),
            response: get("response").unwrap_or(d.response),
            messages: get("messages").unwrap_or(d.messages),
            token_ids,
        }
    }
}

/// One input row: a stable id, where it came from (`FILE:LINE`, for errors) and its example.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub location: String,
    pub example: Example,
}

impl Example {
    /// Reads the example from one JSON object; the error names the missing field.
    pub fn from_json(obj: &Json, fields: &FieldNames) -> Result<Self> {
        let Json::Object(map) = obj else { bail!("row is not a JSON object") };
        let has_ids = |f: &TokenIdFields| map.contains_key(&f.prompt) || map.contains_key(&f.response);
        if let Some(f) = fields.token_ids.as_ref().filter(|f| has_ids(f)) {
            let ids = |name: &str| -> Result<Vec<u32>> {
                let Some(value) = map.get(name) else { bail!("field `{name}` is missing (token ids were asked for)") };
                let Json::Array(list) = value else { bail!("field `{name}` is not a list of token ids") };
                list.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.as_u64()
                            .and_then(|id| u32::try_from(id).ok())
                            .with_context(|| format!("field `{name}[{i}]` is not a token id: {x}"))
                    })
                    .collect()
            };
            let (prompt, response) = (ids(&f.prompt)?, ids(&f.response)?);
            if response.is_empty() {
                bail!("field `{}` is empty: no token to train on", f.response);
            }
            let logprobs = match map.get(&f.logprobs) {
                None | Some(Json::Null) => None,
                Some(Json::Array(list)) => {
                    if list.len() != response.len() {
                        bail!(
                            "field `{}` holds {} values for {} response tokens",
                            f.logprobs,
                            list.len(),
                            response.len()
                        );
                    }
                    let values = list.iter().enumerate().map(|(i, x)| {
                        x.as_f64().filter(|v| *v <= 0.0).map(|v| v as f32).with_context(|| {
                            format!("field `{}[{i}]` is not a log-probability (a number <= 0): {x}", f.logprobs)
                        })
                    });
                    Some(values.collect::<Result<Vec<f32>>>()?)
                }
                Some(_) => bail!("field `{}` is not a list of log-probabilities", f.logprobs),
            };
            let tokenizer = match map.get(&f.tokenizer) {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(other) => bail!("field `{}` is not a string: {other}", f.tokenizer),
            };
            return Ok(Example::Tokens { prompt, response, logprobs, tokenizer });
        }
        let string = |name: &str| -> Result<String> {
            match map.get(name) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(_) => bail!("field `{name}` is not a string"),
                None => bail!("field `{name}` is missing"),
            }
        };
        let shapes: Vec<String> = [
            (map.contains_key(&fields.messages), format!("`{}`", fields.messages)),
            (
                map.contains_key(&fields.prompt) || map.contains_key(&fields.response),
                format!("`{}` / `{}`", fields.prompt, fields.response),
            ),
            (map.contains_key(&fields.text), format!("`{}`", fields.text)),
        ]
        .into_iter()
        .filter_map(|(present, name)| present.then_some(name))
        .collect();
        if shapes.len() > 1 {
            bail!(
                "row has both {}: which one to train on is ambiguous (keep one shape per row, or point --text-field, --prompt-field, --response-field or --messages-field elsewhere)",
                shapes.join(" and ")
            );
        }
        if let Some(messages) = map.get(&fields.messages) {
            let Json::Array(list) = messages else { bail!("field `{}` is not a list", fields.messages) };
            for (i, m) in list.iter().enumerate() {
                if m.get("role").and_then(Json::as_str).is_none() {
                    bail!("field `{}[{i}].role` is missing or not a string", fields.messages);
                }
                // A turn without content would render as empty text; only a tool call may omit it.
                let has_tool_calls = m.get("tool_calls").is_some_and(|t| !t.is_null());
                match m.get("content") {
                    Some(Json::String(_) | Json::Array(_)) => {}
                    Some(Json::Null) | None if has_tool_calls => {}
                    None => bail!("field `{}[{i}].content` is missing", fields.messages),
                    Some(_) => bail!("field `{}[{i}].content` is not a string or a list of parts", fields.messages),
                }
            }
            return Ok(Example::Chat(list.clone()));
        }
        if map.contains_key(&fields.prompt) || map.contains_key(&fields.response) {
            return Ok(Example::PromptResponse {
                prompt: string(&fields.prompt)?,
                response: string(&fields.response)?,
            });
        }
        if map.contains_key(&fields.text) {
            return Ok(Example::Text(string(&fields.text)?));
        }
        bail!(
            "row has none of the fields `{}`, `{}` + `{}`, `{}`",
            fields.text,
            fields.prompt,
            fields.response,
            fields.messages
        )
    }

    /// Token ids and loss mask. `loss_mask[i]` says whether token i is a target.
    /// Prompt/response pairs become a two-turn chat when the model has a template.
    pub fn tokenize(&self, tokenizer: &TextTokenizer, template: Option<&ChatTemplate>) -> Result<MaskedTokens> {
        self.tokenize_up_to(tokenizer, template, None)
    }

    /// Like `tokenize`, for a caller that keeps only the first `max_tokens` tokens: long
    /// text is cut before it is tokenised (`TextTokenizer::prefix_len`), so the result
    /// starts with the same tokens at a cost bounded by `max_tokens`, whatever the
    /// example's length. The result may be longer than `max_tokens`.
    pub fn tokenize_up_to(
        &self,
        tokenizer: &TextTokenizer,
        template: Option<&ChatTemplate>,
        max_tokens: Option<usize>,
    ) -> Result<MaskedTokens> {
        let keep = |text: &str, special: bool| match max_tokens {
            Some(n) => tokenizer.prefix_len(text, n, special),
            None => Ok(text.len()),
        };
        match (self, template) {
            (Example::Tokens { prompt, response, tokenizer: made_by, .. }, _) => {
                let ours = tokenizer.vocab_fingerprint();
                match made_by.as_deref() {
                    Some(theirs) if theirs == ours => {}
                    Some(theirs) => bail!(
                        "field `ids_tokenizer` is {theirs}, but {} is {ours}: the ids are another tokenizer's and would be read as wrong tokens",
                        tokenizer.path().display()
                    ),
                    None => bail!(
                        "field `ids_tokenizer` is missing: nothing says which tokenizer the ids are in \
                         (`distill generate --with-ids` writes it; for ids of {} add \"ids_tokenizer\": \"{ours}\")",
                        tokenizer.path().display()
                    ),
                }
                let vocab = tokenizer.vocab_size();
                if let Some(&id) = prompt.iter().chain(response).find(|&&id| id as usize >= vocab) {
                    bail!("token id {id} is outside the tokenizer's vocabulary ({vocab} tokens): the ids come from another model");
                }
                let mut loss_mask = vec![false; prompt.len()];
                loss_mask.resize(prompt.len() + response.len(), true);
                Ok(MaskedTokens { ids: [prompt.as_slice(), response].concat(), loss_mask })
            }
            (Example::Text(text), _) => {
                let ids = tokenizer.encode(&text[..keep(text, true)?], true)?;
                Ok(MaskedTokens { loss_mask: vec![true; ids.len()], ids })
            }
            (Example::Chat(messages), Some(t)) => {
                let chat = t.render_with_spans_up_to(messages, |text| keep(text, false))?;
                tokenizer.encode_masked(&chat.text, &chat.assistant_spans, false)
            }
            (Example::Chat(_), None) => bail!("chat messages need a chat template, and the model has none"),
            (Example::PromptResponse { prompt, response }, Some(_)) => {
                let chat = Example::Chat(vec![
                    serde_json::json!({"role": "user", "content": prompt}),
                    serde_json::json!({"role": "assistant", "content": response}),
                ]);
                chat.tokenize_up_to(tokenizer, template, max_tokens)
            }
            (Example::PromptResponse { prompt, response }, None) => {
                let text = format!("{prompt}{response}");
                let text = &text[..keep(&text, true)?];
                let response_span = prompt.len().min(text.len())..text.len();
                tokenizer.encode_masked(text, std::slice::from_ref(&response_span), true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_are_recognised_and_missing_fields_named() {
        let f = FieldNames::default();
        assert_eq!(Example::from_json(&json!({"text": "a"}), &f).unwrap(), Example::Text("a".into()));
        let e = Example::from_json(&json!({"prompt": "q"}), &f).unwrap_err().to_string();
        assert!(e.contains("`response`"), "{e}");
        let e = Example::from_json(&json!({"messages": [{"content": "x"}]}), &f).unwrap_err().to_string();
        assert!(e.contains("messages[0].role"), "{e}");
        let e = Example::from_json(&json!({"body": "x"}), &f).unwrap_err().to_string();
        assert!(e.contains("none of the fields"), "{e}");
    }

    #[test]
    fn token_id_rows_train_the_response_only() {
        let f = FieldNames { token_ids: Some(TokenIdFields::default()), ..FieldNames::default() };
        // Text fields are kept for people; the ids are what the teacher sees.
        let row = json!({"messages": [], "prompt_ids": [5, 6], "response_ids": [7, 8, 9]});
        let example = Example::from_json(&row, &f).unwrap();
        assert_eq!(
            example,
            Example::Tokens { prompt: vec![5, 6], response: vec![7, 8, 9], logprobs: None, tokenizer: None }
        );
        let sampled = json!({"prompt_ids": [5], "response_ids": [7, 8], "response_logprobs": [-0.5, 0], "ids_tokenizer": "xxh3:1"});
        let example = Example::from_json(&sampled, &f).unwrap();
        let tokenizer = Some("xxh3:1".to_string());
        assert_eq!(
            example,
            Example::Tokens { prompt: vec![5], response: vec![7, 8], logprobs: Some(vec![-0.5, 0.0]), tokenizer }
        );
        // A row without ids is fixed data, read as text.
        assert_eq!(Example::from_json(&json!({"text": "a"}), &f).unwrap(), Example::Text("a".into()));
        for (bad, field) in [
            (json!({"prompt_ids": [1]}), "`response_ids` is missing"),
            (json!({"prompt_ids": [1], "response_ids": []}), "`response_ids` is empty"),
            (json!({"prompt_ids": [1, -2], "response_ids": [3]}), "`prompt_ids[1]` is not a token id"),
            (json!({"prompt_ids": "1 2", "response_ids": [3]}), "`prompt_ids` is not a list"),
            (json!({"prompt_ids": [1], "response_ids": [3], "response_logprobs": [0.5]}), "`response_logprobs[0]`"),
            (json!({"prompt_ids": [1], "response_ids": [3], "response_logprobs": []}), "0 values for 1 response"),
        ] {
            let e = Example::from_json(&bad, &f).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
