//! `tokenizer.json` through the `tokenizers` crate, with the checks that catch the most
//! common distillation failure (a tokenizer that does not fit the model's vocabulary),
//! and encoding with a loss mask derived from byte spans.
use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::model::ModelConfig;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Bytes of the longest vocabulary entry: a token stands for at most about this many
    /// bytes of text (times a normaliser's shrink), which bounds how much text `n`
    /// tokens can need.
    max_token_bytes: usize,
    /// What an id means: see `vocab_fingerprint`.
    fingerprint: String,
}

/// Token ids and, per token, whether a loss trains on predicting it.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedTokens {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: tokenizer file not found", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let vocab = inner.get_vocab(true);
        let max_token_bytes = vocab.keys().map(String::len).max().unwrap_or(1).max(1);
        let mut by_id: Vec<(u32, &str)> = vocab.iter().map(|(token, &id)| (id, token.as_str())).collect();
        by_id.sort_unstable();
        let listed: String = by_id.iter().map(|(id, token)| format!("{id}\t{token}\n")).collect();
        let fingerprint = crate::files::checksum_bytes(listed.as_bytes());
        Ok(TextTokenizer { inner, path: path.to_path_buf(), max_token_bytes, fingerprint })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// xxh3 of the vocabulary (every id with its token, added tokens included): two
    /// tokenizers with the same fingerprint give an id the same meaning, whatever else
    /// differs in their files. Rows of token ids carry it (`ids_tokenizer`) so that ids
    /// are never read by another tokenizer's model.
    pub fn vocab_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Number of ids the tokenizer can produce (vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Largest id the tokenizer can produce.
    pub fn max_id(&self) -> u32 {
        self.inner.get_vocab(true).values().copied().max().unwrap_or(0)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Refuses a tokenizer that can emit ids outside the model's embedding table. A model
    /// may have more rows than tokens (Qwen2 pads 151,646 tokens to 152,064 rows).
    pub fn check_fits(&self, config: &ModelConfig, config_path: &Path) -> Result<()> {
        let max_id = self.max_id() as usize;
        if max_id >= config.vocab_size {
            bail!(
                "{} produces ids up to {max_id} ({} tokens) but {} has field `vocab_size` = {}: the tokenizer does not belong to this model",
                self.path.display(),
                self.vocab_size(),
                config_path.display(),
                config.vocab_size
            );
        }
        Ok(())
    }

    /// Plain text, with the tokenizer's own special tokens (e.g. BOS) added.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes `text` and marks the tokens that overlap any of the byte `spans`.
    pub fn encode_masked(&self, text: &str, spans: &[Range<usize>], add_special_tokens: bool) -> Result<MaskedTokens> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        let loss_mask = enc
            .get_offsets()
            .iter()
            .zip(enc.get_special_tokens_mask())
            .map(|(&(start, end), &special)| {
                // Tokens the post-processor adds (BOS) have empty offsets and no span.
                let added = special == 1 && start == end;
                !added && spans.iter().any(|s| start < s.end && s.start < end.max(start + 1))
            })
            .collect();
        Ok(MaskedTokens { ids: enc.get_ids().to_vec(), loss_mask })
    }

    /// The length of a prefix of `text` whose tokens start with the first `tokens`
    /// tokens of the whole `text` (the whole length when it is short): so a long text
    /// cut to a few tokens is not tokenised whole (a 50 MB line would take gigabytes).
    /// Tokenisation is local, so the prefix ends `MARGIN` tokens after token `tokens`;
    /// the text read to find that end is bounded by the longest token times 4 (a
    /// normaliser may shrink text, e.g. full-width letters, up to 3 bytes to 1).
    pub fn prefix_len(&self, text: &str, tokens: usize, add_special_tokens: bool) -> Result<usize> {
        const MARGIN: usize = 64;
        let budget = (tokens + MARGIN + 8).saturating_mul(4 * self.max_token_bytes);
        if budget >= text.len() {
            return Ok(text.len());
        }
        let read = floor_char_boundary(text, budget);
        let enc = self
            .inner
            .encode(&text[..read], add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(match enc.get_offsets().get(tokens + MARGIN) {
            Some(&(_, end)) => floor_char_boundary(text, end),
            // Fewer tokens than the bound promises (a tokenizer beyond the bound): read it all.
            None => text.len(),
        })
    }

    /// Ids of the added tokens marked special (BOS, EOS, chat markers): control tokens
    /// that stand for no text.
    pub fn special_ids(&self) -> std::collections::HashSet<u32> {
        self.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect()
    }

    /// Text of the added tokens that are not special, by id (written as is, not through
    /// the model's byte mapping).
    pub fn plain_added_tokens(&self) -> std::collections::HashMap<u32, String> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| !t.special)
            .map(|(id, t)| (id, t.content))
            .collect()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot decode: {e}", self.path.display()))
    }
}

/// Tokenizer files copied next to a saved model so that it is complete on its own.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// The largest char boundary of `text` at or below `at`.
pub fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut i = at.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Copies whichever of `TOKENIZER_FILES` exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("cannot copy {} to {}", src.display(), to.display()))?;
        }
    }
    Ok(())
}
