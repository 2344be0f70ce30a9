//! Cross-tokenizer alignment: the student's tokenisation of the text a teacher saw, and
//! the groups of tokens on both sides that cover the same bytes.
//!
//! A teacher document's ids are turned back into bytes (`token_bytes`), the student's
//! tokenizer encodes that text, and both token sequences are cut where their byte
//! boundaries coincide: a group is teacher tokens `[t0, t1)` and student tokens
//! `[s0, s1)` over one span of bytes, the smallest such spans. A 1:1 group is the same
//! string on both sides; in a group of several teacher tokens the teacher's
//! probability of the span is its first token's times the label probabilities of the
//! rest (what TRL's GOLD does), and the same on the student side.
//!
//! Traps handled (each broke someone's implementation): multi-byte characters split
//! across tokens (bytes, not character offsets, are compared), a BOS or EOS on one side
//! only (special tokens stand for no text and join no group), a SentencePiece prefix
//! space that is not in the text (dropped from the student's first token), whitespace
//! written into the next word (`Ġthe`, `▁the`: only bytes count), and text cut by
//! `max_len` in the middle of a character (the incomplete character's tokens stay
//! unaligned). Teacher special tokens inside a document (chat markers) split it into
//! segments that the student encodes one by one.
pub mod set;
pub mod targets;
pub mod token_bytes;

use anyhow::{bail, Result};
use std::ops::Range;

use crate::tokenizer::TextTokenizer;
use token_bytes::TokenBytes;

/// Teacher tokens `teacher` and student tokens `student` that cover the same bytes
/// (indices into the document's teacher ids and its student ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub teacher: Range<usize>,
    pub student: Range<usize>,
}

/// One document in the student's tokens, with its groups in text order.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentAlignment {
    pub student_ids: Vec<u32>,
    pub groups: Vec<Group>,
}

pub struct Aligner<'a> {
    teacher: &'a TokenBytes,
    student: &'a TokenBytes,
    student_tokenizer: &'a TextTokenizer,
}

impl<'a> Aligner<'a> {
    pub fn new(teacher: &'a TokenBytes, student: &'a TokenBytes, student_tokenizer: &'a TextTokenizer) -> Self {
        Aligner { teacher, student, student_tokenizer }
    }

    /// The student's tokens for the document the teacher saw as `teacher_ids`, and the
    /// groups. The student's own special tokens (its BOS) are added at the start.
    pub fn align(&self, teacher_ids: &[u32]) -> Result<DocumentAlignment> {
        let mut out = DocumentAlignment { student_ids: vec![], groups: vec![] };
        let mut t = 0;
        while t < teacher_ids.len() {
            // A segment: teacher tokens with text, up to the next special token.
            let start = t;
            while t < teacher_ids.len() && self.teacher.of(teacher_ids[t]).is_some() {
                t += 1;
            }
            if t > start || start == 0 {
                self.align_segment(&teacher_ids[start..t], start, start == 0, &mut out)?;
            }
            t += usize::from(t == start);
        }
        Ok(out)
    }

    /// Appends the student's tokens for teacher tokens `ids` (at `offset` in the
    /// document, none special) and their groups.
    fn align_segment(&self, ids: &[u32], offset: usize, first: bool, out: &mut DocumentAlignment) -> Result<()> {
        let pieces: Vec<&[u8]> = ids.iter().map(|&id| self.teacher.of(id).unwrap_or_default()).collect();
        let bytes: Vec<u8> = pieces.concat();
        // A character cut by max_len at the end: align the complete text before it.
        let valid = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = std::str::from_utf8(&bytes[..valid]).expect("valid up to here");
        let student_ids =
            if text.is_empty() && !first { vec![] } else { self.student_tokenizer.encode(text, first)? };
        let mut student_ends = vec![];
        let mut spelled = vec![];
        for &id in &student_ids {
            spelled.extend_from_slice(self.student.of(id).unwrap_or_default());
            student_ends.push(spelled.len());
        }
        // A SentencePiece prefix space that the text does not have.
        let shift =
            usize::from(spelled.len() == valid + 1 && spelled.first() == Some(&b' ') && spelled[1..] == bytes[..valid]);
        if spelled[shift..] != bytes[..valid] {
            let at = spelled[shift..].iter().zip(&bytes[..valid]).take_while(|(a, b)| a == b).count();
            bail!(
                "the student's tokenizer does not spell the teacher's text back (a normaliser?): they differ at byte {at} of {:?}",
                String::from_utf8_lossy(&bytes[..valid.min(at + 40)])
            );
        }
        let mut teacher_ends = vec![];
        let mut end = 0;
        for p in &pieces {
            end += p.len();
            teacher_ends.push(end);
        }
        let base = out.student_ids.len();
        // Tokens that stand for no bytes (the student's BOS) join no group.
        let first_with_bytes = student_ends.iter().take_while(|&&e| e <= shift).count();
        let (mut t, mut s) = (0, first_with_bytes);
        let (mut t0, mut s0) = (t, s);
        while t < ids.len() && s < student_ids.len() {
            let (te, se) = (teacher_ends[t], student_ends[s].saturating_sub(shift));
            if te > valid {
                break;
            }
            if te == se {
                out.groups.push(Group { teacher: offset + t0..offset + t + 1, student: base + s0..base + s + 1 });
                t += 1;
                s += 1;
                (t0, s0) = (t, s);
            } else if te < se {
                t += 1;
            } else {
                s += 1;
            }
        }
        out.student_ids.extend(student_ids);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tokenizers made here from JSON: byte-level BPE with BOS, and a SentencePiece
    /// style one (prefix space, byte fallback, no BOS), each over a small vocabulary.
    fn tokenizers(dir: &std::path::Path) -> (TextTokenizer, TextTokenizer) {
        let byte_level = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": byte_level_vocab(), "merges": [["Ġ", "a"], ["Ġa", "b"], ["Ã", "©"]]}
        });
        let spm = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": spm_vocab(), "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"], ["▁", "é"]]}
        });
        let write = |name: &str, json: serde_json::Value| {
            let path = dir.join(name);
            std::fs::write(&path, json.to_string()).unwrap();
            TextTokenizer::from_file(&path).unwrap()
        };
        (write("byte-level.json", byte_level), write("spm.json", spm))
    }

    fn byte_level_vocab() -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<s>".into(), 0.into());
        for (i, c) in token_bytes::byte_level_chars().iter().enumerate() {
            vocab.insert(c.to_string(), (i + 1).into());
        }
        for (i, t) in ["Ġa", "Ġab", "Ã©"].iter().enumerate() {
            vocab.insert(t.to_string(), (257 + i).into());
        }
        vocab.into()
    }

    fn spm_vocab() -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), 0.into());
        for b in 0..256 {
            vocab.insert(format!("<0x{b:02X}>"), (1 + b).into());
        }
        for (i, t) in ["▁", "a", "b", "é", "▁a", "ab", "▁ab", "▁é", "c", "d"].iter().enumerate() {
            vocab.insert(t.to_string(), (257 + i).into());
        }
        vocab.into()
    }

    fn spelled(bytes: &TokenBytes, ids: &[u32]) -> Vec<u8> {
        ids.iter().flat_map(|&id| bytes.of(id).unwrap_or_default().to_vec()).collect()
    }

    #[test]
    fn groups_cover_the_same_bytes_through_emoji_cjk_accents_and_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let (teacher_tok, student_tok) = tokenizers(dir.path());
        let (tb, sb) = (TokenBytes::new(&teacher_tok).unwrap(), TokenBytes::new(&student_tok).unwrap());
        assert_eq!((tb.spelling, sb.spelling), (token_bytes::Spelling::ByteLevel, token_bytes::Spelling::Metaspace));
        let aligner = Aligner::new(&tb, &sb, &student_tok);
        for text in ["ab ab", "é ab café", "東京 😀 👩‍👩‍👧", "ab  ab\t\nab ", " ab", "abc d é"] {
            let teacher_ids = teacher_tok.encode(text, true).unwrap();
            assert_eq!(teacher_ids[0], 0, "the teacher has a BOS, the student none");
            let a = aligner.align(&teacher_ids).unwrap();
            assert_eq!(a.student_ids, student_tok.encode(text, true).unwrap());
            // The groups tile both sides in order: every teacher token but the BOS, every
            // student token, each group the same bytes on both sides.
            // A lone prefix space ("▁" before a character the vocabulary lacks) stands
            // for no byte of the text and joins no group.
            let lone_prefix = !text.starts_with(' ') && sb.of(a.student_ids[0]) == Some(b" ");
            let (mut t, mut s) = (1, usize::from(lone_prefix));
            for g in &a.groups {
                assert_eq!((g.teacher.start, g.student.start), (t, s), "{text:?}: {:?}", a.groups);
                let (tbytes, mut sbytes) =
                    (spelled(&tb, &teacher_ids[g.teacher.clone()]), spelled(&sb, &a.student_ids[g.student.clone()]));
                if g.student.start == 0 && !text.starts_with(' ') && !lone_prefix {
                    sbytes.remove(0); // the prefix space
                }
                assert_eq!(tbytes, sbytes, "{text:?}: group {g:?}");
                (t, s) = (g.teacher.end, g.student.end);
            }
            assert_eq!((t, s), (teacher_ids.len(), a.student_ids.len()), "{text:?}");
        }
        // "é ab": the student's "▁é" ... the teacher's "Ã©" then "Ġab": 1:1 groups, and
        // "東" in three bytes on both sides (byte fallback vs byte-level): 1:1 bytes.
        let ids = teacher_tok.encode("é ab", true).unwrap();
        let a = aligner.align(&ids).unwrap();
        assert_eq!(a.groups, [Group { teacher: 1..2, student: 0..1 }, Group { teacher: 2..3, student: 1..2 }]);
    }

    #[test]
    fn special_tokens_split_segments_and_a_cut_character_stays_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let (teacher_tok, student_tok) = tokenizers(dir.path());
        let (tb, sb) = (TokenBytes::new(&teacher_tok).unwrap(), TokenBytes::new(&student_tok).unwrap());
        let aligner = Aligner::new(&tb, &sb, &student_tok);
        // BOS, "ab", BOS again (an EOS-like marker inside), " ab": two segments.
        let mut ids = teacher_tok.encode("ab", true).unwrap();
        let marker = ids.len();
        ids.push(0);
        ids.extend(teacher_tok.encode(" ab", false).unwrap());
        let a = aligner.align(&ids).unwrap();
        let second = student_tok.encode(" ab", false).unwrap();
        assert_eq!(a.student_ids, [student_tok.encode("ab", true).unwrap(), second].concat());
        assert!(a.groups.iter().all(|g| !g.teacher.contains(&0) && !g.teacher.contains(&marker)));
        assert!(a.groups.iter().any(|g| g.teacher.start == marker + 1), "the second segment aligns: {:?}", a.groups);
        assert_eq!(a.groups.last().unwrap().teacher.end, ids.len());
        // "😀" cut after two of its four bytes: the text before it aligns, the cut
        // character's tokens join no group.
        let full = teacher_tok.encode("ab 😀", true).unwrap();
        let cut = &full[..full.len() - 2];
        let a = aligner.align(cut).unwrap();
        assert!(a.groups.iter().all(|g| g.teacher.end <= cut.len() - 2), "{:?}", a.groups);
        assert_eq!(spelled(&sb, &a.student_ids), b" ab ");
    }
}
