//! Tokenizers matching llama.cpp's for GGUF files: SentencePiece (`tokenizer.ggml.model =
//! "llama"`: Gemma 3, Llama 1/2, Mistral v1, Phi-3; llama.cpp's `llm_tokenizer_spm`) and
//! byte-level BPE (`"gpt2"`: Llama 3, Qwen, DeepSeek, gpt-oss; `llm_tokenizer_bpe`, in `bpe`).
//!
//! Encoding: special tokens are cut out of the input first (`special`), then each
//! remaining fragment goes through SentencePiece BPE (`spm`) or byte-level BPE (`bpe`).
//! Decoding renders each id to bytes (`decode`); [`StreamDecoder`] reassembles characters
//! split across tokens. Derived tables (attributes, end-of-generation set, split order) are
//! built once in `setup`. Reading a GGUF file is confined to `gguf_load`.

mod bpe;
mod decode;
mod gguf_load;
mod setup;
mod special;
mod spm;
mod vocab;

use std::collections::{BTreeSet, HashMap};
use std::fmt;

pub use decode::StreamDecoder;
pub use vocab::{token_type, BpeSpec, SpecialIds, Vocab};

use setup::attr;
use special::{Fragment, SpecialMatcher};

/// A vocabulary that cannot be used. Each variant names the GGUF key at fault.
#[derive(Debug)]
pub enum TokenizerError {
    /// A required key is absent.
    MissingKey(&'static str),
    /// A key is present but its value is unusable.
    BadValue { key: String, reason: String },
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    Unsupported { model: String, reason: &'static str },
    /// The GGUF reader rejected a key (wrong type, out of range).
    Gguf(crate::gguf::GgufError),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::MissingKey(key) => write!(f, "tokenizer: missing key {key}"),
            TokenizerError::BadValue { key, reason } => write!(f, "tokenizer: bad {key}: {reason}"),
            TokenizerError::Unsupported { model, reason } => {
                write!(f, "tokenizer: tokenizer.ggml.model = {model:?}: {reason}")
            }
            TokenizerError::Gguf(e) => write!(f, "tokenizer: {e}"),
        }
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenizerError::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<crate::gguf::GgufError> for TokenizerError {
    fn from(e: crate::gguf::GgufError) -> Self {
        TokenizerError::Gguf(e)
    }
}

/// A loaded tokenizer. Immutable and cheap to share across threads.
pub struct Tokenizer {
    texts: Vec<String>,
    scores: Vec<f32>,
    attrs: Vec<u16>,
    ids: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    special: SpecialIds,
    eog: BTreeSet<u32>,
    matcher: SpecialMatcher,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Byte-level BPE tables; None for SentencePiece.
    bpe: Option<Box<bpe::Bpe>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.texts.len())
            .field("special", &self.special)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Load the tokenizer a GGUF file describes.
    pub fn from_gguf(g: &crate::gguf::Gguf) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_vocab(gguf_load::read_vocab(g)?)
    }

    /// Build from an explicit vocabulary (tests, other formats).
    pub fn from_vocab(v: Vocab) -> Result<Tokenizer, TokenizerError> {
        validate(&v)?;
        let t = setup::build(&v);
        let matcher = SpecialMatcher::new(t.split_order, &t.texts);
        let byte_tokens = byte_tokens(&t.ids, t.special.unk);
        let bpe = match &v.bpe {
            None => None,
            Some(spec) => Some(Box::new(
                bpe::Bpe::new(&v.tokens, &spec.merges, &spec.pre)
                    .map_err(|reason| TokenizerError::BadValue { key: "tokenizer.ggml.pre".into(), reason })?,
            )),
        };
        Ok(Tokenizer {
            texts: t.texts,
            scores: t.scores,
            attrs: t.attrs,
            ids: t.ids,
            byte_tokens,
            special: t.special,
            eog: t.eog,
            matcher,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
            add_space_prefix: v.add_space_prefix,
            bpe,
        })
    }

    /// Token ids for `text`. `add_special` adds BOS/EOS as the model asks;
    /// `parse_special` lets control tokens written in the text (`<start_of_turn>`) become
    /// those tokens. User-defined tokens are always recognised.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.special.bos);
        }
        let spm = spm::SpmVocab { ids: &self.ids, scores: &self.scores, byte_tokens: &self.byte_tokens };
        // The space prefix goes on text at the very start or right after a special token.
        let mut after_special = true;
        for fragment in self.matcher.partition(text.as_bytes(), parse_special, &self.attrs) {
            match fragment {
                Fragment::Text(range) => {
                    // Cuts fall on character boundaries: special texts are valid UTF-8.
                    let piece = text.get(range).unwrap_or_default();
                    match &self.bpe {
                        Some(bpe) => bpe.encode(piece, &mut out),
                        None => spm::encode(&spm, piece, self.add_space_prefix && after_special, &mut out),
                    }
                    after_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.special.eos);
        }
        out
    }

    /// The bytes `id` stands for; control tokens render as nothing. Unknown ids give
    /// nothing. A piece may be part of a UTF-8 character (byte tokens): use
    /// [`StreamDecoder`] when printing pieces one by one.
    pub fn token_to_piece(&self, id: u32) -> Vec<u8> {
        self.token_to_piece_with(id, false)
    }

    /// As [`token_to_piece`](Self::token_to_piece); `render_special` renders control
    /// tokens as their text (`<start_of_turn>`).
    pub fn token_to_piece_with(&self, id: u32, render_special: bool) -> Vec<u8> {
        match (self.texts.get(id as usize), self.attrs.get(id as usize)) {
            (Some(text), Some(&a)) => match &self.bpe {
                Some(bpe) if a & attr::NORMAL != 0 => bpe.unspell(text),
                _ => decode::piece(text, a, render_special),
            },
            _ => Vec::new(),
        }
    }

    /// Text for `ids`, as llama.cpp's `llama_detokenize(remove_special = false,
    /// unparse_special = false)`: control tokens vanish, invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, false, false)).into_owned()
    }

    /// llama.cpp's `llama_detokenize` for SPM, as bytes. `remove_special` drops a leading
    /// BOS and trailing EOS where the model adds them; `render_special` renders control
    /// tokens. With `add_space_prefix`, one leading space of the first piece is dropped
    /// (the space encoding added), except after a removed BOS, as llama.cpp does.
    pub fn detokenize(&self, ids: &[u32], remove_special: bool, render_special: bool) -> Vec<u8> {
        let mut ids = ids;
        let mut strip_space = self.add_space_prefix;
        if let (true, Some((&first, rest))) = (remove_special && self.add_bos, ids.split_first()) {
            if Some(first) == self.special.bos {
                strip_space = false;
                ids = rest;
            }
        }
        if let (true, Some((&last, rest))) = (remove_special && self.add_eos, ids.split_last()) {
            if Some(last) == self.special.eos {
                ids = rest;
            }
        }
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_to_piece_with(id, render_special);
            let skip = usize::from(i == 0 && strip_space && piece.first() == Some(&b' '));
            out.extend_from_slice(&piece[skip..]);
        }
        out
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.special.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.special.eos
    }

    /// End-of-turn token, from the file or recognised by its text (`<end_of_turn>`).
    pub fn eot(&self) -> Option<u32> {
        self.special.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.special.unk
    }

    pub fn pad(&self) -> Option<u32> {
        self.special.pad
    }

    /// All role ids, including those recognised by text.
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Whether generating `id` ends generation (EOS, EOT, `<end_of_turn>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Control tokens (including those llama.cpp promotes to control by their text).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The vocabulary text of `id` (spaces spelled U+2581).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|s| s.as_str())
    }

    /// The id whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }
}

/// Reject vocabularies the tables cannot be built from. Scores and types may be longer
/// than the token list (llama.cpp reads only the first n), not shorter.
fn validate(v: &Vocab) -> Result<(), TokenizerError> {
    let n = v.tokens.len();
    let bad = |key: &str, reason: String| Err(TokenizerError::BadValue { key: key.to_string(), reason });
    if n == 0 {
        return bad("tokenizer.ggml.tokens", "the token list is empty".into());
    }
    if n > i32::MAX as usize {
        return bad("tokenizer.ggml.tokens", format!("{n} tokens do not fit 31-bit ids"));
    }
    if !v.scores.is_empty() && v.scores.len() < n {
        let reason = format!("{} scores for {n} tokens", v.scores.len());
        return bad("tokenizer.ggml.scores", reason);
    }
    if !v.token_types.is_empty() && v.token_types.len() < n {
        let reason = format!("{} token types for {n} tokens", v.token_types.len());
        return bad("tokenizer.ggml.token_type", reason);
    }
    for (key, id) in v.special.fields() {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            return bad(key, format!("token id {id} is out of range (vocabulary has {n} tokens)"));
        }
    }
    Ok(())
}

/// Token for each byte value: `<0xXX>`, else the byte itself as a one-character token,
/// else the unknown token.
fn byte_tokens(ids: &HashMap<String, u32>, unk: Option<u32>) -> [Option<u32>; 256] {
    let mut table = [None; 256];
    for (b, slot) in table.iter_mut().enumerate() {
        let hex = ids.get(&format!("<0x{b:02X}>"));
        // A lone byte is a string only if it is ASCII.
        let raw = (b < 0x80).then(|| ids.get(&(b as u8 as char).to_string())).flatten();
        *slot = hex.or(raw).copied().or(unk);
    }
    table
}
