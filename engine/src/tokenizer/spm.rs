//! SentencePiece BPE on one raw fragment (llama.cpp `llm_tokenizer_spm_session`).
//!
//! The fragment is split into UTF-8 characters; then, repeatedly, the adjacent pair whose
//! concatenation is a vocabulary token with the highest score is merged (ties go to the
//! leftmost pair). A priority queue holds candidate pairs; entries made stale by an
//! earlier merge are recognised by their recorded byte size and dropped. Finally each
//! symbol becomes its token, or, if it is a lone character outside the vocabulary, one
//! byte token per UTF-8 byte.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A run of bytes in the escaped fragment, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and `left`'s next.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the pair when queued; differs once either side has changed.
    size: usize,
}

impl Ord for Bigram {
    /// Higher score first, then the leftmost pair. A NaN score (hostile file) compares as
    /// equal, as llama.cpp's `<` comparator treats it.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// What SPM needs from the vocabulary.
pub(crate) struct SpmVocab<'a> {
    pub ids: &'a HashMap<String, u32>,
    pub scores: &'a [f32],
    /// Token for each byte value, for characters outside the vocabulary.
    pub byte_tokens: &'a [Option<u32>; 256],
}

/// Tokenize one raw fragment, appending ids to `out`. `space_prefix` prepends a space
/// (the model's `add_space_prefix` at the start of input or after a special token).
pub(crate) fn encode(v: &SpmVocab, fragment: &str, space_prefix: bool, out: &mut Vec<u32>) {
    // SentencePiece spells spaces as U+2581 "▁".
    let mut text = String::with_capacity(fragment.len() + 3);
    if space_prefix {
        text.push('\u{2581}');
    }
    for c in fragment.chars() {
        text.push(if c == ' ' { '\u{2581}' } else { c });
    }
    let mut session = Session { v, text: &text, symbols: Vec::new(), queue: BinaryHeap::new() };
    session.run(out);
}

struct Session<'a, 'v> {
    v: &'a SpmVocab<'v>,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

impl Session<'_, '_> {
    fn run(&mut self, out: &mut Vec<u32>) {
        let n = self.text.chars().count();
        self.symbols.reserve(n);
        for (i, (start, c)) in self.text.char_indices().enumerate() {
            self.symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            });
        }
        for i in 1..self.symbols.len() {
            self.try_add_bigram(i - 1, i);
        }
        self.merge_all();

        let mut at = if self.symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            self.emit(self.symbols[i], out);
            at = self.symbols[i].next;
        }
    }

    fn piece(&self, start: usize, len: usize) -> &str {
        // Symbol bounds always fall on character boundaries of `text`.
        self.text.get(start..start + len).unwrap_or("")
    }

    /// Queue the merge of `left` and `right` if their concatenation is a token.
    fn try_add_bigram(&mut self, left: usize, right: usize) {
        let (l, r) = (self.symbols[left], self.symbols[right]);
        let size = l.len + r.len;
        let Some(&id) = self.v.ids.get(self.piece(l.start, size)) else {
            return;
        };
        let score = self.v.scores.get(id as usize).copied().unwrap_or(0.0);
        self.queue.push(Bigram { score, left, right, size });
    }

    fn merge_all(&mut self) {
        while let Some(b) = self.queue.pop() {
            let (l, r) = (self.symbols[b.left], self.symbols[b.right]);
            // Stale: one side was merged away or has grown since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            self.symbols[b.left].len = b.size;
            self.symbols[b.left].next = r.next;
            self.symbols[b.right].len = 0;
            if let Some(n) = r.next {
                self.symbols[n].prev = Some(b.left);
            }
            if let Some(p) = l.prev {
                self.try_add_bigram(p, b.left);
            }
            if let Some(n) = r.next {
                self.try_add_bigram(b.left, n);
            }
        }
    }

    /// A merged symbol is always a token (it was queued because it is one); a lone
    /// character may not be, and then falls back to byte tokens.
    fn emit(&self, s: Symbol, out: &mut Vec<u32>) {
        let piece = self.piece(s.start, s.len);
        if let Some(&id) = self.v.ids.get(piece) {
            out.push(id);
            return;
        }
        // No byte token and no unknown token: llama.cpp would throw; we drop the byte.
        out.extend(piece.bytes().filter_map(|b| self.v.byte_tokens[b as usize]));
    }
}
