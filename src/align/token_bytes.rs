//! The exact bytes of text each token id stands for, from `tokenizer.json` itself.
//!
//! Aligning two tokenizations by the `tokenizers` crate's offsets fails on the cases that
//! matter: offsets count characters of the normalised text, so the two byte-level tokens
//! of one split "é" (`Ã`, `©`) both claim the whole character, and a SentencePiece-style
//! tokenizer's prefix space belongs to no character of the input. Byte strings per id do
//! not have those problems: concatenated, a document's tokens give back its bytes.
//!
//! Two ways of writing text are read: byte-level BPE (GPT-2's map of the 256 bytes to
//! printable characters; Llama 3, Qwen, SmolLM, Mistral's Tekken) and SentencePiece-style
//! (`▁` for a space, `<0xNN>` byte fallback; Llama 2, Mistral v1, Gemma). Special added
//! tokens (BOS, EOS, chat markers) stand for no text; other added tokens for their content.
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use crate::tokenizer::TextTokenizer;

/// How a tokenizer's vocabulary entries spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// Every byte is one printable character (GPT-2's `bytes_to_unicode`).
    ByteLevel,
    /// Text as UTF-8 with `▁` for a space; `<0xNN>` entries are single bytes.
    Metaspace,
}

/// The bytes of every id of one tokenizer; `None` for special tokens.
pub struct TokenBytes {
    pub spelling: Spelling,
    bytes: Vec<Option<Vec<u8>>>,
}

impl TokenBytes {
    pub fn new(tokenizer: &TextTokenizer) -> Result<Self> {
        let path = tokenizer.path();
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: Json = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let spelling = spelling_of(&json).with_context(|| format!("{}", path.display()))?;
        let specials = tokenizer.special_ids();
        let plain_added = tokenizer.plain_added_tokens();
        let inverse = byte_level_inverse();
        let bytes = (0..=tokenizer.max_id())
            .map(|id| {
                if specials.contains(&id) {
                    return None;
                }
                if let Some(content) = plain_added.get(&id) {
                    return Some(content.as_bytes().to_vec());
                }
                let token = tokenizer.id_to_token(id)?;
                Some(match spelling {
                    Spelling::ByteLevel => token
                        .chars()
                        .flat_map(|c| match inverse(c) {
                            Some(b) => vec![b],
                            None => c.to_string().into_bytes(),
                        })
                        .collect(),
                    Spelling::Metaspace => match byte_fallback(&token) {
                        Some(b) => vec![b],
                        None => token.replace('\u{2581}', " ").into_bytes(),
                    },
                })
            })
            .collect();
        Ok(TokenBytes { spelling, bytes })
    }

    /// The bytes id `id` stands for; `None` for a special token or an id the tokenizer
    /// does not have.
    pub fn of(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// Number of ids (the largest id + 1).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// `<0xNN>` → the byte NN.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The spelling a tokenizer's decoder undoes.
fn spelling_of(json: &Json) -> Result<Spelling> {
    let decoder = json.get("decoder").unwrap_or(&Json::Null);
    let parts: Vec<&Json> = match decoder.get("type").and_then(Json::as_str) {
        Some("Sequence") => {
            decoder.get("decoders").and_then(Json::as_array).map(|d| d.iter().collect()).unwrap_or_default()
        }
        _ => vec![decoder],
    };
    let kinds: Vec<&str> = parts.iter().filter_map(|d| d.get("type").and_then(Json::as_str)).collect();
    if kinds.contains(&"ByteLevel") {
        return Ok(Spelling::ByteLevel);
    }
    let replaces_metaspace = parts.iter().any(|d| {
        d.get("type").and_then(Json::as_str) == Some("Replace")
            && d.pointer("/pattern/String").and_then(Json::as_str) == Some("\u{2581}")
    });
    if kinds.contains(&"Metaspace") || replaces_metaspace {
        return Ok(Spelling::Metaspace);
    }
    bail!(
        "decoder {:?}: cross-tokenizer alignment reads byte-level BPE and SentencePiece-style (\u{2581}, <0xNN>) tokenizers",
        if kinds.is_empty() { vec!["none"] } else { kinds }
    )
}

/// GPT-2's `bytes_to_unicode`: the printable character that stands for each byte.
pub fn byte_level_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("below 0x200")
        })
        .collect()
}

/// `byte_level_chars`, inverted: the byte each printable character stands for.
fn byte_level_inverse() -> impl Fn(char) -> Option<u8> {
    let map: std::collections::HashMap<char, u8> =
        byte_level_chars().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect();
    move |c| map.get(&c).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_characters_map_back_to_bytes() {
        let inverse = byte_level_inverse();
        // GPT-2's map: printable ASCII is itself, the space is Ġ (U+0120), newline Ċ.
        assert_eq!(inverse('a'), Some(b'a'));
        assert_eq!(inverse('Ġ'), Some(b' '));
        assert_eq!(inverse('Ċ'), Some(b'\n'));
        assert_eq!(inverse('Ã'), Some(0xC3));
        assert_eq!(inverse('©'), Some(0xA9));
        assert_eq!(inverse('ð'), Some(0xF0));
        assert_eq!(inverse('中'), None);
        assert_eq!(byte_fallback("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_fallback("<0xF0>"), Some(0xF0));
        assert_eq!(byte_fallback("<0x0>"), None);
    }

    #[test]
    fn the_decoder_names_the_spelling() {
        let json = |s: &str| serde_json::from_str::<Json>(s).unwrap();
        assert_eq!(spelling_of(&json(r#"{"decoder": {"type": "ByteLevel"}}"#)).unwrap(), Spelling::ByteLevel);
        let spm = r#"{"decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}]}}"#;
        assert_eq!(spelling_of(&json(spm)).unwrap(), Spelling::Metaspace);
        let e = spelling_of(&json(r#"{"decoder": {"type": "WordPiece"}}"#)).unwrap_err().to_string();
        assert!(e.contains("WordPiece"), "{e}");
    }
}
