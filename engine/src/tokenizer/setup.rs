//! Derived token tables, built once per vocabulary the way llama.cpp's `llama_vocab::load`
//! does: per-token attributes, roles found by token text, the end-of-generation set, and
//! the order in which special tokens are split out of input text.

use std::collections::{BTreeSet, HashMap};

use super::vocab::{token_type, SpecialIds, Vocab};

/// Per-token attribute bits (llama.cpp `llama_token_attr`; only the bits we act on).
pub(crate) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    /// Swallow whitespace to the left when split out of text.
    pub const LSTRIP: u16 = 1 << 7;
    /// Swallow whitespace to the right when split out of text.
    pub const RSTRIP: u16 = 1 << 8;
}

// Token texts llama.cpp recognises when the file does not name the role explicitly.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Texts that end generation, whatever their declared type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// gpt-oss (Harmony) markers that llama.cpp always renders, so it forces them user-defined.
const ALWAYS_RENDERED_TEXTS: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Everything derived from a [`Vocab`].
pub(crate) struct Tables {
    /// Token texts, with empty ones renamed `[EMPTY_<id>]` as llama.cpp does.
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u16>,
    /// Text to id. With duplicate texts the highest id wins (llama.cpp overwrites).
    pub ids: HashMap<String, u32>,
    pub special: SpecialIds,
    pub eog: BTreeSet<u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order in which
    /// they are split out of input text.
    pub split_order: Vec<u32>,
}

pub(crate) fn build(v: &Vocab) -> Tables {
    let texts: Vec<String> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t.clone() })
        .collect();
    let scores = (0..texts.len()).map(|i| v.scores.get(i).copied().unwrap_or(0.0)).collect();
    let attrs = (0..texts.len()).map(|i| v.token_types.get(i).map_or(attr::NORMAL, |&t| attr_of_type(t))).collect();
    let mut ids = HashMap::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        ids.insert(t.clone(), i as u32);
    }
    let mut t =
        Tables { texts, scores, attrs, ids, special: v.special.clone(), eog: BTreeSet::new(), split_order: Vec::new() };
    detect_roles(&mut t);
    build_eog(&mut t);
    t.split_order = split_order(&t);
    apply_model_quirks(&mut t, &v.model_name);
    t
}

fn attr_of_type(t: i32) -> u16 {
    match t {
        token_type::NORMAL => attr::NORMAL,
        token_type::UNKNOWN => attr::UNKNOWN,
        token_type::CONTROL => attr::CONTROL,
        token_type::USER_DEFINED => attr::USER_DEFINED,
        token_type::UNUSED => attr::UNUSED,
        token_type::BYTE => attr::BYTE,
        _ => 0,
    }
}

impl Tables {
    /// Ids reachable by text (for duplicate texts only the winner), ascending. llama.cpp
    /// walks its text-to-id map for the detections below; we walk the same set in id order.
    fn canonical_ids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.ids.values().copied().collect();
        out.sort_unstable();
        out
    }

    fn text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", |s| s.as_str())
    }

    fn add_attr(&mut self, id: u32, bits: u16) {
        if let Some(a) = self.attrs.get_mut(id as usize) {
            *a |= bits;
        }
    }

    fn set_attr(&mut self, id: u32, bits: u16) {
        if let Some(a) = self.attrs.get_mut(id as usize) {
            *a = bits;
        }
    }
}

/// Fill roles the file left unset from well-known token texts, and mark what was found
/// as control (a converter that forgot the role usually forgot the type too).
fn detect_roles(t: &mut Tables) {
    for id in t.canonical_ids() {
        let text = t.text(id).to_owned();
        let s = &mut t.special;
        let slots: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut s.eot, EOT_TEXTS),
            (&mut s.eom, EOM_TEXTS),
            (&mut s.fim_pre, FIM_PRE_TEXTS),
            (&mut s.fim_suf, FIM_SUF_TEXTS),
            (&mut s.fim_mid, FIM_MID_TEXTS),
            (&mut s.fim_pad, FIM_PAD_TEXTS),
            (&mut s.fim_rep, FIM_REP_TEXTS),
            (&mut s.fim_sep, FIM_SEP_TEXTS),
        ];
        let mut found = false;
        for (slot, names) in slots {
            if slot.is_none() && names.contains(&text.as_str()) {
                *slot = Some(id);
                found = true;
            }
        }
        if found {
            t.add_attr(id, attr::CONTROL);
        }
    }
}

/// The end-of-generation set: FIM pad/repo/separator, every token with an EOG text, EOS,
/// EOT and EOM, minus two exceptions for vocabularies where a listed text is not an end.
fn build_eog(t: &mut Tables) {
    let s = t.special.clone();
    t.eog.extend([s.fim_pad, s.fim_rep, s.fim_sep].into_iter().flatten());
    for id in t.canonical_ids() {
        let (is_eog, always_rendered) = (EOG_TEXTS.contains(&t.text(id)), ALWAYS_RENDERED_TEXTS.contains(&t.text(id)));
        if is_eog {
            t.eog.insert(id);
            t.add_attr(id, attr::CONTROL);
        }
        if always_rendered {
            t.set_attr(id, attr::USER_DEFINED);
        }
    }
    t.eog.extend([s.eos, s.eot, s.eom].into_iter().flatten());

    // Harmony (gpt-oss) and solar-open end a message with <|end|> but a turn with
    // <|return|>/<|call|> (<|calls|>/<|flush|>): there <|end|> must not stop generation.
    let has = |t: &Tables, names: &[&str]| t.eog.iter().any(|&id| names.contains(&t.text(id)));
    let end_id = t.eog.iter().rev().copied().find(|&id| t.text(id) == "<|end|>");
    let has_return = has(t, &["<|return|>"]);
    let has_call = has(t, &["<|call|>", "<|calls|>"]);
    let has_flush = has(t, &["<|flush|>"]);
    if let Some(end) = end_id {
        if has_call && (has_return || has_flush) {
            t.eog.remove(&end);
            t.set_attr(end, attr::USER_DEFINED);
        }
    }

    // Gemma 4 and PLaMo-2 use </s> as ordinary text.
    let s_id = t.eog.iter().rev().copied().find(|&id| t.text(id) == "</s>");
    if let Some(s_id) = s_id {
        if has(t, &["<|tool_response>", "<|plamo:eos|>"]) {
            t.eog.remove(&s_id);
            t.set_attr(s_id, attr::NORMAL);
        }
    }
}

/// Control, user-defined and unknown tokens, longest first. llama.cpp uses an unstable
/// sort here, so its order among equal lengths is unspecified; we break ties by id. The
/// order only matters for equal-length texts that overlap each other in the input, which
/// no special-token pair in Gemma 3's vocabulary can do.
fn split_order(t: &Tables) -> Vec<u32> {
    let wanted = attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN;
    let mut order: Vec<u32> = (0..t.texts.len() as u32).filter(|&id| t.attrs[id as usize] & wanted != 0).collect();
    order.sort_by_key(|&id| std::cmp::Reverse(t.texts[id as usize].len()));
    order
}

/// Per-model attribute fixes llama.cpp applies by `general.name`. Only Phi-3 concerns SPM
/// vocabularies: its special tokens eat the whitespace that follows them.
fn apply_model_quirks(t: &mut Tables, model_name: &str) {
    let name = model_name.to_ascii_lowercase();
    if !(name.contains("phi-3") || name.contains("phi3")) {
        return;
    }
    for id in t.split_order.clone() {
        t.add_attr(id, attr::RSTRIP);
    }
    let set = |t: &mut Tables, text: &str, on: bool| {
        if let Some(&id) = t.ids.get(text) {
            if let Some(a) = t.attrs.get_mut(id as usize) {
                *a = if on { *a | attr::RSTRIP } else { *a & !attr::RSTRIP };
            }
        }
    };
    set(t, "</s>", true);
    for text in ["<unk>", "<s>", "<|endoftext|>"] {
        set(t, text, false);
    }
}
