//! Tokenizer built from GGUF metadata with the `tokenizers` crate, and the ChatML template.
//!
//! What reproduces llama.cpp's ids for SmolLM2 (`tokenizer.ggml.pre = "smollm"`): a byte-level BPE
//! from the GGUF vocab and merges; pre-tokenizer = `Digits` (each digit alone) then `ByteLevel`
//! (no prefix space, GPT-2 regex); `ByteLevel` decoder; every control token (type 3) special.

use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::{Error, Result};

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`...).
const TOKEN_TYPE_CONTROL: i32 = 3;

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
        if model != "gpt2" {
            return Err(Error::model(
                path,
                format!(
                    "tokenizer.ggml.model is '{model}': only byte-level BPE ('gpt2') is supported"
                ),
            ));
        }
        let tokens = string_array(content, "tokenizer.ggml.tokens", path)?;
        let merges = match content.metadata.get("tokenizer.ggml.merges") {
            Some(_) => string_array(content, "tokenizer.ggml.merges", path)?,
            None => Vec::new(),
        };
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
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
        let specials: Vec<String> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| (*s).clone())
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
        Self::build(vocab, parsed, &specials, eos_id, tokens.len())
    }

    /// Build from parts: used by [`Tokenizer::from_gguf`] and by the tiny test model.
    pub fn build(
        vocab: Vocab,
        merges: Vec<(String, String)>,
        specials: &[String],
        eos_id: u32,
        vocab_size: usize,
    ) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let im_start_id = inner.token_to_id("<|im_start|>");
        let im_end_id = inner.token_to_id("<|im_end|>");
        Ok(Tokenizer {
            inner,
            eos_id,
            im_start_id,
            im_end_id,
            vocab_size,
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

    /// Ids that end an assistant turn: EOS and `<|im_end|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos_id];
        if let Some(id) = self.im_end_id {
            if id != self.eos_id {
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
