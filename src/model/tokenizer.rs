//! Tokenizer built from GGUF metadata with the `tokenizers` crate, and the ChatML template.
//!
//! Two kinds, by `tokenizer.ggml.model`; in both every control or user-defined token (types 3
//! and 4) is split out of the text whole before anything else, as llama.cpp does.
//!
//! `llama` (SentencePiece, Gemma): spaces become `▁` (and a leading `▁` when
//! `tokenizer.ggml.add_space_prefix`), then BPE merges ranked by the score of the piece they
//! make (llama.cpp's `llm_tokenizer_spm` merges the adjacent pair whose piece scores highest),
//! bytes of characters outside the vocabulary as `<0xXX>` tokens.
//!
//! `gpt2` (byte-level BPE): the GGUF vocab and merges, a `ByteLevel` decoder, and the
//! pre-tokenizer `tokenizer.ggml.pre` names, as llama.cpp's `llama-vocab.cpp` splits text for
//! it ([`PRE_TOKENIZERS`]):
//! - `smollm` (SmolLM2; also a file that names none): `Digits` (each digit alone) then
//!   `ByteLevel` with the GPT-2 regex;
//! - `qwen2`: the Qwen2 regex (letters, single digits, punctuation runs, newlines, spaces), then
//!   `ByteLevel` without a regex of its own;
//! - `llama-bpe` (Llama 3): as `qwen2`, with digits in runs of up to three.

use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use super::chat::ChatTemplate;
use crate::{Error, Result};

/// GGUF token type of control tokens (`<|im_start|>`, `<bos>`...): split out of the text whole,
/// left out of decoded text unless asked for.
const CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens (Qwen's `<tool_call>`, Gemma's runs of newlines and
/// spaces, HTML tags): split out of the text whole, decoded as text.
const USER_DEFINED: i32 = 4;

/// The Qwen2 split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Llama 3 split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values this tokenizer reproduces.
pub const PRE_TOKENIZERS: &[&str] = &["smollm", "qwen2", "llama-bpe"];

/// The pre-tokenizer for a `tokenizer.ggml.pre` name (`None`: the file names none).
fn pre_tokenizer(pre: Option<&str>) -> std::result::Result<Sequence, String> {
    let split = |regex: &str| -> std::result::Result<Sequence, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]))
    };
    match pre {
        None | Some("smollm") => Ok(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])),
        Some("qwen2") => split(QWEN2_REGEX),
        Some("llama-bpe") => split(LLAMA3_REGEX),
        Some(other) => Err(format!(
            "tokenizer.ggml.pre is '{other}': supported pre-tokenizers are {}",
            PRE_TOKENIZERS.join(", ")
        )),
    }
}

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// How text becomes the pieces BPE merges: byte-level (GPT-2 style) or SentencePiece.
enum Kind {
    ByteLevel {
        pre: Sequence,
        /// Llama 3: a whole pre-token found in the vocabulary is one token.
        ignore_merges: bool,
    },
    SentencePiece {
        add_space_prefix: bool,
    },
}

/// SentencePiece BPE as merges: every split of a piece into two pieces of the vocabulary,
/// ranked by the score of the piece it makes (highest first), as Hugging Face's converter
/// writes Gemma's `tokenizer.json`. Control, byte and unused tokens (types 3, 5, 6) are never
/// made by merging.
fn spm_merges(tokens: &[&String], scores: &[f32], types: &[i32], vocab: &Vocab) -> Merges {
    let mergeable = |id: u32| matches!(types.get(id as usize), Some(1) | None);
    let mut ranked: Vec<(f32, u32, u32, usize)> = Vec::new(); // (score, left id, right id, piece)
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i as u32) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores.get(i).copied().unwrap_or(0.0), a, b, i));
            }
        }
    }
    // Highest score first; among one piece's splits, by the ids of the halves.
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.3.cmp(&y.3))
            .then((x.1, x.2).cmp(&(y.1, y.2)))
    });
    ranked
        .into_iter()
        .map(|(_, a, b, _)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
        .collect()
}

/// A BPE tokenizer plus the special ids generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// End-of-sequence id (`tokenizer.ggml.eos_token_id`).
    pub eos_id: u32,
    /// `<|im_start|>` id, if the vocabulary has it.
    pub im_start_id: Option<u32>,
    /// `<|im_end|>` id, if the vocabulary has it.
    pub im_end_id: Option<u32>,
    vocab_size: usize,
    /// The chat template (the file's, or ChatML / plain where it has none).
    pub chat: ChatTemplate,
    /// A further id that ends an answer: under the plain template, the one token of its turn
    /// close (`\n\n`), since no special token ends its turns.
    turn_close_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn string_array<'a>(content: &'a Content, key: &str, path: &Path) -> Result<Vec<&'a String>> {
    match content.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_string()
                    .map_err(|_| Error::model(path, format!("{key}: expected strings")))
            })
            .collect(),
        Some(_) => Err(Error::model(path, format!("{key}: expected an array"))),
        None => Err(Error::model(path, format!("missing metadata key {key}"))),
    }
}

impl Tokenizer {
    /// Build the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let model = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(Error::model(
                path,
                format!(
                    "tokenizer.ggml.model is '{model}': supported are byte-level BPE ('gpt2') and SentencePiece ('llama')"
                ),
            ));
        }
        let tokens = string_array(content, "tokenizer.ggml.tokens", path)?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let flag = |key: &str| match content.metadata.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        let specials: Vec<(String, i32)> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| [CONTROL, USER_DEFINED].contains(t))
            .map(|(s, t)| ((*s).clone(), *t))
            .collect();
        let eos_id = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| {
                Error::model(path, "missing metadata key tokenizer.ggml.eos_token_id")
            })?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, s)| ((*s).clone(), i as u32))
            .collect();
        let (merges, kind) = if model == "llama" {
            let scores: Vec<f32> = match content.metadata.get("tokenizer.ggml.scores") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.to_f32().unwrap_or(0.0))
                    .collect(),
                _ => return Err(Error::model(path, "missing metadata key tokenizer.ggml.scores (SentencePiece needs the pieces' scores)")),
            };
            let kind = Kind::SentencePiece {
                // llama.cpp's default for SentencePiece files that do not say.
                add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            };
            (spm_merges(&tokens, &scores, &types, &vocab), kind)
        } else {
            let merges = match content.metadata.get("tokenizer.ggml.merges") {
                Some(_) => string_array(content, "tokenizer.ggml.merges", path)?,
                None => Vec::new(),
            };
            let mut parsed = Vec::with_capacity(merges.len());
            for (i, m) in merges.iter().enumerate() {
                let (a, b) = m.split_once(' ').ok_or_else(|| {
                    Error::model(
                        path,
                        format!("tokenizer.ggml.merges[{i}]: '{m}' is not 'a b'"),
                    )
                })?;
                parsed.push((a.to_string(), b.to_string()));
            }
            let pre_name = content
                .metadata
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok())
                .map(String::as_str);
            let kind = Kind::ByteLevel {
                pre: pre_tokenizer(pre_name).map_err(|e| Error::model(path, e))?,
                // llama.cpp looks a whole pre-token up in the vocabulary before merging for
                // Llama 3.
                ignore_merges: pre_name == Some("llama-bpe"),
            };
            (parsed, kind)
        };
        let mut tok = Self::build(vocab, merges, kind, &specials, eos_id, tokens.len())?;
        let text_of = |key: &str| -> String {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize))
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        let chatml = tok.im_start_id.is_some() && tok.im_end_id.is_some();
        tok.chat = ChatTemplate::new(
            template,
            chatml,
            &text_of("tokenizer.ggml.bos_token_id"),
            &text_of("tokenizer.ggml.eos_token_id"),
        )
        .map_err(|e| Error::model(path, e.to_string()))?;
        if tok.chat.source == super::chat::TemplateSource::Plain {
            if let [id] = tok.encode(&tok.chat.frame().close)?[..] {
                tok.turn_close_id = Some(id);
            }
        }
        Ok(tok)
    }

    /// Build from parts (see [`Tokenizer::from_gguf`]).
    fn build(
        vocab: Vocab,
        merges: Merges,
        kind: Kind,
        specials: &[(String, i32)],
        eos_id: u32,
        vocab_size: usize,
    ) -> Result<Self> {
        let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        let builder = BPE::builder().vocab_and_merges(vocab, merges);
        let mut inner = match kind {
            Kind::ByteLevel { pre, ignore_merges } => {
                let bpe = builder.ignore_merges(ignore_merges).build().map_err(err)?;
                let mut inner = HfTokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(pre));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
                inner
            }
            Kind::SentencePiece { add_space_prefix } => {
                let bpe = builder.byte_fallback(true).build().map_err(err)?;
                let mut inner = HfTokenizer::new(bpe);
                let space = Replace::new(" ", SPM_SPACE).map_err(err)?;
                let mut norms = vec![NormalizerWrapper::Replace(space)];
                let mut decoders = vec![
                    DecoderWrapper::Replace(Replace::new(SPM_SPACE, " ").map_err(err)?),
                    DecoderWrapper::ByteFallback(ByteFallback::default()),
                    DecoderWrapper::Fuse(Fuse::default()),
                ];
                if add_space_prefix {
                    norms.insert(
                        0,
                        NormalizerWrapper::Prepend(Prepend::new(SPM_SPACE.into())),
                    );
                    decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
                }
                inner
                    .with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
                    .map_err(err)?;
                inner.with_decoder(Some(DecoderSequence::new(decoders)));
                inner
            }
        };
        // Both kinds match the raw text (not normalized), as llama.cpp splits them out.
        let added = |kind: i32| -> Vec<AddedToken> {
            specials
                .iter()
                .filter(|(_, t)| *t == kind)
                .map(|(s, _)| AddedToken::from(s.clone(), kind == CONTROL).normalized(false))
                .collect()
        };
        inner
            .add_special_tokens(added(CONTROL))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner
            .add_tokens(added(USER_DEFINED))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let im_start_id = inner.token_to_id("<|im_start|>");
        let im_end_id = inner.token_to_id("<|im_end|>");
        let chat = ChatTemplate::new(None, im_start_id.is_some() && im_end_id.is_some(), "", "")?;
        Ok(Tokenizer {
            inner,
            eos_id,
            im_start_id,
            im_end_id,
            vocab_size,
            chat,
            turn_close_id: None,
        })
    }

    /// Token ids of `text`; special tokens written literally (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included verbatim when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.inner
            .decode(ids, !keep_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The string form of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Ids that end an assistant turn: EOS, `<|im_end|>`, and under the plain template its
    /// turn close (a paragraph break: a pretrained base answers in one paragraph).
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos_id];
        for id in [self.im_end_id, self.turn_close_id].into_iter().flatten() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// The system prompt SmolLM2-Instruct's own template inserts when none is given.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message.
pub fn chatml_message(role: &str, content: &str) -> String {
    format!("<|im_start|>{role}\n{content}<|im_end|>\n")
}

/// ChatML header that opens the assistant's turn.
pub const CHATML_ASSISTANT: &str = "<|im_start|>assistant\n";

/// A whole conversation rendered with ChatML, ending with an open assistant turn.
pub fn chatml_prompt(messages: &[Message]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&chatml_message(&m.role, &m.content));
    }
    s.push_str(CHATML_ASSISTANT);
    s
}

/// Incremental detokenizer for streaming: yields only text that is complete UTF-8.
#[derive(Debug, Default)]
pub struct TokenStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TokenStream {
    /// Add a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, false)?;
        if text.len() > self.printed
            && !text.ends_with('\u{fffd}')
            && text.is_char_boundary(self.printed)
        {
            let new = text[self.printed..].to_string();
            self.printed = text.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// All text so far.
    pub fn text(&self, tok: &Tokenizer) -> Result<String> {
        tok.decode(&self.ids, false)
    }
}
