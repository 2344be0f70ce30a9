//! Examples in the shapes users have (plain `text`, `prompt` + `response`, chat
//! `messages`) read from JSONL, and their tokenisation with a loss mask: every token
//! for plain text, only the response / assistant tokens otherwise.
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::io::BufRead;
use std::path::Path;

use crate::chat::ChatTemplate;
use crate::tokenizer::{MaskedTokens, TextTokenizer};

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String),
    PromptResponse { prompt: String, response: String },
    Chat(Vec<Json>),
}

/// Which JSON fields hold each shape.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub text: String,
    pub prompt: String,
    pub response: String,
    pub messages: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            prompt: "prompt".into(),
            response: "response".into(),
            messages: "messages".into(),
        }
    }
}

/// One input row: a stable id and its example.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub example: Example,
}

impl Example {
    /// Reads the example from one JSON object; the error names the missing field.
    pub fn from_json(obj: &Json, fields: &FieldNames) -> Result<Self> {
        let Json::Object(map) = obj else { bail!("row is not a JSON object") };
        let string = |name: &str| -> Result<String> {
            match map.get(name) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(_) => bail!("field `{name}` is not a string"),
                None => bail!("field `{name}` is missing"),
            }
        };
        if let Some(messages) = map.get(&fields.messages) {
            let Json::Array(list) = messages else { bail!("field `{}` is not a list", fields.messages) };
            for (i, m) in list.iter().enumerate() {
                if m.get("role").and_then(Json::as_str).is_none() {
                    bail!("field `{}[{i}].role` is missing or not a string", fields.messages);
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
        match (self, template) {
            (Example::Text(text), _) => {
                let ids = tokenizer.encode(text, true)?;
                Ok(MaskedTokens { loss_mask: vec![true; ids.len()], ids })
            }
            (Example::Chat(messages), Some(t)) => {
                let chat = t.render_with_spans(messages)?;
                tokenizer.encode_masked(&chat.text, &chat.assistant_spans, false)
            }
            (Example::Chat(_), None) => bail!("chat messages need a chat template, and the model has none"),
            (Example::PromptResponse { prompt, response }, Some(_)) => {
                let chat = Example::Chat(vec![
                    serde_json::json!({"role": "user", "content": prompt}),
                    serde_json::json!({"role": "assistant", "content": response}),
                ]);
                chat.tokenize(tokenizer, template)
            }
            (Example::PromptResponse { prompt, response }, None) => {
                let text = format!("{prompt}{response}");
                let response_span = prompt.len()..text.len();
                tokenizer.encode_masked(&text, std::slice::from_ref(&response_span), true)
            }
        }
    }
}

/// Reads a JSONL file; errors name the file and line. Blank lines are skipped.
pub fn read_jsonl(path: &Path, fields: &FieldNames) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut records = vec![];
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("{}:{line_no}: cannot read line", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let obj: Json =
            serde_json::from_str(&line).with_context(|| format!("{}:{line_no}: not valid JSON", path.display()))?;
        let example = Example::from_json(&obj, fields).with_context(|| format!("{}:{line_no}", path.display()))?;
        let id = match obj.get("id") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => format!("{stem}:{line_no}"),
        };
        records.push(Record { id, example });
    }
    if records.is_empty() {
        bail!("{}: no examples (the file is empty)", path.display());
    }
    Ok(records)
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
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"ok\"}\n\n{\"text\": 3}\n").unwrap();
        let e = format!("{:#}", read_jsonl(&p, &FieldNames::default()).unwrap_err());
        assert!(e.contains("d.jsonl:3") && e.contains("`text`"), "{e}");
        std::fs::write(&p, "{\"text\": \"ok\"\n").unwrap();
        let e = format!("{:#}", read_jsonl(&p, &FieldNames::default()).unwrap_err());
        assert!(e.contains("d.jsonl:1") && e.contains("JSON"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(format!("{:#}", read_jsonl(&p, &FieldNames::default()).unwrap_err()).contains("empty"));
    }
}
