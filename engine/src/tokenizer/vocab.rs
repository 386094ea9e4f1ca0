//! The tokenizer's input: token texts, scores, types and special ids as a GGUF file
//! states them, before any of llama.cpp's derived tables are built.

/// `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Ids of the tokens with a role. `None` means the model has no such token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

impl SpecialIds {
    /// Each role with its GGUF key, for range checks and error messages.
    pub(crate) fn fields(&self) -> [(&'static str, Option<u32>); 14] {
        [
            ("tokenizer.ggml.bos_token_id", self.bos),
            ("tokenizer.ggml.eos_token_id", self.eos),
            ("tokenizer.ggml.eot_token_id", self.eot),
            ("tokenizer.ggml.eom_token_id", self.eom),
            ("tokenizer.ggml.unknown_token_id", self.unk),
            ("tokenizer.ggml.seperator_token_id", self.sep),
            ("tokenizer.ggml.padding_token_id", self.pad),
            ("tokenizer.ggml.mask_token_id", self.mask),
            ("tokenizer.ggml.fim_pre_token_id", self.fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", self.fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", self.fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", self.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", self.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", self.fim_sep),
        ]
    }
}

/// A SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Token texts; the index is the id. Spaces are spelled U+2581 as in the file.
    pub tokens: Vec<String>,
    /// Merge priority per token (higher merges first). Empty means all 0.
    pub scores: Vec<f32>,
    /// [`token_type`] per token. Empty means all normal.
    pub token_types: Vec<i32>,
    pub special: SpecialIds,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Prepend a space to text that starts the input or follows a special token.
    pub add_space_prefix: bool,
    /// `general.name`: llama.cpp keys a few per-model token attributes off it (Phi-3).
    pub model_name: String,
    /// For a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`): its merges
    /// (`"left right"`, best first) and pre-tokenizer name. None for SentencePiece.
    pub bpe: Option<BpeSpec>,
}

/// What a byte-level BPE vocabulary adds.
#[derive(Clone, Debug, Default)]
pub struct BpeSpec {
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre` ("llama-bpe", "qwen2", ...; "default" when absent).
    pub pre: String,
}

impl Vocab {
    /// A vocabulary with llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0 (each only if in
    /// range), add BOS, no EOS, space prefix on.
    pub fn new(tokens: Vec<String>, scores: Vec<f32>, token_types: Vec<i32>) -> Vocab {
        let n = tokens.len();
        let in_range = |id: u32| ((id as usize) < n).then_some(id);
        Vocab {
            tokens,
            scores,
            token_types,
            special: SpecialIds { bos: in_range(1), eos: in_range(2), unk: in_range(0), ..SpecialIds::default() },
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            model_name: String::new(),
            bpe: None,
        }
    }
}
