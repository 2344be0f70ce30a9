//! Chat templates: the Jinja template of `tokenizer_config.json` (or `chat_template.jinja`)
//! rendered with minijinja under transformers' settings (trim_blocks, lstrip_blocks,
//! loop controls, `raise_exception`, `tojson`, Python string methods), and the
//! character spans of assistant turns, from which the loss mask is derived.
//!
//! The spans come from rendering prefixes of the conversation: turn i spans from the
//! end of `render(messages[..i], add_generation_prompt=true)` to the end of
//! `render(messages[..=i])`. This works for templates without `{% generation %}` blocks
//! (most of them) and checks that each prefix really is a prefix of the full text.
use anyhow::{bail, Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub struct ChatTemplate {
    env: Environment<'static>,
    special: Json,
    origin: PathBuf,
}

/// A rendered conversation and the byte ranges of its assistant turns.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    pub text: String,
    pub assistant_spans: Vec<Range<usize>>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// The model directory's template: `chat_template.jinja` if present (what
    /// transformers >= 4.43 writes), else `chat_template` in `tokenizer_config.json`.
    /// `Ok(None)` when the model has no template.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config_path.display()))?
            }
            Err(_) => Json::Null,
        };
        let special = special_tokens(&config);
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
            return Self::new(source, special, jinja).map(Some);
        }
        let source = match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.clone(),
            // Several named templates: take "default", as transformers does.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from))
                .with_context(|| {
                    format!("{}: field `chat_template` lists no template named \"default\"", config_path.display())
                })?,
            Some(_) => bail!("{}: field `chat_template` is neither a string nor a list", config_path.display()),
        };
        Self::new(source, special, config_path).map(Some)
    }

    /// Compiles `source`. `special` holds bos_token, eos_token, ... as template variables.
    pub fn new(source: String, special: Json, origin: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, neutralise_generation_tags(&source))
            .with_context(|| format!("{}: the chat template does not compile", origin.display()))?;
        Ok(ChatTemplate { env, special, origin })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Renders `messages` (a list of `{role, content, ...}` objects).
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).expect("template added in new");
        let mut ctx = self.special.as_object().cloned().unwrap_or_default();
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("raise_exception").to_string(),
                _ => format!("{e:#}"),
            };
            anyhow::anyhow!("chat template {} rejected the conversation: {detail}", self.origin.display())
        })
    }

    /// Renders the conversation and finds the byte span of every assistant turn.
    pub fn render_with_spans(&self, messages: &[Json]) -> Result<RenderedChat> {
        self.render_with_spans_up_to(messages, |text| Ok(text.len()))
    }

    /// Renders the conversation, keeps its first `limit(text)` bytes and finds the spans
    /// of the assistant turns that start there. Each turn is located by rendering the
    /// conversation up to it, so a cut conversation costs the turns it keeps, not the
    /// square of all its turns.
    pub fn render_with_spans_up_to(
        &self,
        messages: &[Json],
        limit: impl FnOnce(&str) -> Result<usize>,
    ) -> Result<RenderedChat> {
        let mut text = self.render(messages, false)?;
        let keep = crate::tokenizer::floor_char_boundary(&text, limit(&text)?);
        let mut assistant_spans = vec![];
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Json::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            if before.len() >= keep {
                break;
            }
            let through = self.render(&messages[..=i], false)?;
            let end = through.len().min(text.len());
            if !through.starts_with(&before) || !text.starts_with(&through[..end]) || before.len() > end {
                bail!(
                    "chat template {}: message {i} (assistant) cannot be located: rendering the earlier messages does not give a prefix of the full conversation",
                    self.origin.display()
                );
            }
            assistant_spans.push(before.len()..end.min(keep));
        }
        text.truncate(keep);
        Ok(RenderedChat { text, assistant_spans })
    }
}

/// bos_token, eos_token, pad_token, unk_token as strings (tokenizer_config.json holds
/// either strings or `{"content": ...}` objects).
fn special_tokens(config: &Json) -> Json {
    let mut out = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let value = match config.get(key) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(String::from),
            _ => None,
        };
        out.insert(key.into(), value.map(Json::String).unwrap_or(Json::String(String::new())));
    }
    Json::Object(out)
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker tags) become
/// `{% if true %}` / `{% endif %}`, keeping their whitespace control.
fn neutralise_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        match inner {
            "generation" => out.push_str(&tag.replacen("generation", "if true", 1)),
            "endgeneration" => out.push_str(&tag.replacen("endgeneration", "endif", 1)),
            _ => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: no HTML escaping, non-ASCII kept, optional indent.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, minijinja::Error> {
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = match indent {
        None => serde_json::to_string(&json),
        Some(n) => {
            let pad = " ".repeat(n);
            let mut buf = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&json, &mut ser).map(|_| String::from_utf8(buf).expect("JSON is UTF-8"))
        }
    }
    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(text))
}

/// transformers' `strftime_now(format)` for the codes chat templates use (%d %m %Y %b %B).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    format
        .replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Days since 1970-01-01 -> (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src.into(), json!({"bos_token": "<s>", "eos_token": "</s>"}), "test".into()).unwrap()
    }

    #[test]
    fn assistant_spans_cover_reply_and_end_token() {
        let t = template(CHATML);
        let msgs = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": "Bye"}),
            json!({"role": "assistant", "content": "Bye."}),
        ];
        let r = t.render_with_spans(&msgs).unwrap();
        let spans: Vec<&str> = r.assistant_spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, vec!["Hello!<|im_end|>\n", "Bye.<|im_end|>\n"]);
    }

    #[test]
    fn raise_exception_names_the_reason() {
        let t = template("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}");
        let e = t.render(&[json!({"role": "robot", "content": "x"})], false).unwrap_err().to_string();
        assert!(e.contains("Unknown role: robot"), "{e}");
    }

    #[test]
    fn generation_tags_and_python_methods_work() {
        let t = template("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content.strip() }}{% endgeneration %}{% else %}{{ m.content.upper() }}{% endif %}{% endfor %}");
        let out = t
            .render(&[json!({"role": "user", "content": "q"}), json!({"role": "assistant", "content": " a "})], false)
            .unwrap();
        assert_eq!(out, "Qa");
    }

    #[test]
    fn tojson_does_not_escape_html_or_unicode() {
        let t = template("{{ messages[0] | tojson }}");
        let out = t.render(&[json!({"role": "user", "content": "<é>"})], false).unwrap();
        assert_eq!(out, r#"{"role":"user","content":"<é>"}"#);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
    }
}
