//! What `distill generate` continues, read from the dataset rows distill already reads:
//! `{"messages"}` rendered with the chat template and its generation prompt (a trailing
//! assistant turn is the row's reference answer, not part of the prompt), `{"prompt"}`
//! (a one-turn chat when the model has a template, else plain text; a `response` is the
//! reference) and `{"text"}` (continued as is). Output rows keep the input's fields and
//! add the response.
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as Json};

use crate::chat::ChatTemplate;
use crate::dataset::read::RawRow;
use crate::dataset::{Example, FieldNames};
use crate::tokenizer::TextTokenizer;

/// The shape a prompt came in, which decides the shape of its output row.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptShape {
    /// The turns before the reply (the output appends the reply as an assistant turn).
    Chat(Vec<Json>),
    Prompt,
    Text,
}

#[derive(Debug, Clone)]
pub struct PromptRow {
    pub id: String,
    pub location: String,
    pub fields: Map<String, Json>,
    pub shape: PromptShape,
    /// The answer the input carried (a trailing assistant turn, or `response`).
    pub reference: Option<String>,
    pub ids: Vec<u32>,
}

/// Reads and tokenises every row; the error names the row.
pub fn prompt_rows(
    raw: Vec<RawRow>,
    fields: &FieldNames,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PromptRow>> {
    raw.into_iter()
        .map(|r| {
            let location = r.location.clone();
            prompt_row(r, fields, tokenizer, template).with_context(|| location)
        })
        .collect()
}

fn prompt_row(
    raw: RawRow,
    fields: &FieldNames,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
) -> Result<PromptRow> {
    let obj = raw.row?;
    let Json::Object(map) = &obj else { bail!("row is not a JSON object") };
    let string = |name: &str| match map.get(name) {
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => bail!("field `{name}` is not a string"),
        None => Ok(None),
    };
    let need_template = || template.context("chat messages need a chat template, and the model has none");
    let (shape, reference, ids) = if map.contains_key(&fields.messages) {
        let Example::Chat(mut messages) = Example::from_json(&obj, fields)? else {
            unreachable!("messages read as chat")
        };
        let mut reference = None;
        while messages.last().and_then(|m| m.get("role")).and_then(Json::as_str) == Some("assistant") {
            let last = messages.pop().expect("checked above");
            reference = reference.or(last.get("content").and_then(Json::as_str).map(str::to_string));
        }
        if messages.is_empty() {
            bail!("field `{}` holds no turn before the assistant's: nothing to answer", fields.messages);
        }
        let text = need_template()?.render(&messages, true)?;
        (PromptShape::Chat(messages), reference, tokenizer.encode(&text, false)?)
    } else if let Some(prompt) = string(&fields.prompt)? {
        let ids = match template {
            Some(t) => tokenizer.encode(&t.render(&[json!({"role": "user", "content": prompt})], true)?, false)?,
            None => tokenizer.encode(&prompt, true)?,
        };
        if prompt.is_empty() {
            bail!("field `{}` is empty: nothing to answer", fields.prompt);
        }
        (PromptShape::Prompt, string(&fields.response)?, ids)
    } else if let Some(text) = string(&fields.text)? {
        if text.is_empty() {
            bail!("field `{}` is empty: nothing to continue", fields.text);
        }
        (PromptShape::Text, None, tokenizer.encode(&text, true)?)
    } else {
        bail!("row has none of the fields `{}`, `{}`, `{}`", fields.messages, fields.prompt, fields.text);
    };
    if ids.is_empty() {
        bail!("the prompt has no token");
    }
    Ok(PromptRow { id: raw.id, location: raw.location, fields: map.clone(), shape, reference, ids })
}

/// The output row of `prompt` answered with `response`, readable again by `precompute`
/// and `train`: chat rows get the reply as a final assistant turn of `messages`, prompt
/// rows get it as `response`, text rows become the whole text in `text` with the new
/// part also in `continuation`. The input's answer, if any, moves to `reference`.
pub fn output_row(prompt: &PromptRow, fields: &FieldNames, response: &str, extra: Map<String, Json>) -> Json {
    let mut row = prompt.fields.clone();
    row.insert("id".into(), json!(prompt.id));
    if let Some(reference) = &prompt.reference {
        row.insert("reference".into(), json!(reference));
    }
    match &prompt.shape {
        PromptShape::Chat(messages) => {
            let mut turns = messages.clone();
            turns.push(json!({"role": "assistant", "content": response}));
            row.insert(fields.messages.clone(), Json::Array(turns));
        }
        PromptShape::Prompt => {
            row.insert(fields.response.clone(), json!(response));
        }
        PromptShape::Text => {
            let text = row.get(&fields.text).and_then(Json::as_str).unwrap_or_default().to_string();
            row.insert(fields.text.clone(), json!(format!("{text}{response}")));
            row.insert("continuation".into(), json!(response));
        }
    }
    row.extend(extra);
    Json::Object(row)
}
