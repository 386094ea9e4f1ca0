//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen 2/3, DeepSeek, gpt-oss),
//! matching llama.cpp's `llm_tokenizer_bpe`.
//!
//! Text is first cut into words by the pre-tokenizer the file names (`tokenizer.ggml.pre`):
//! a list of regular expressions, each splitting every piece the previous ones left into
//! its matches and the gaps between them. Each word's bytes are spelled with GPT-2's
//! byte-to-character table, then adjacent symbols are merged lowest rank first (ties: the
//! leftmost pair) until no listed merge applies. Each symbol is then its token; a symbol
//! the vocabulary lacks falls back to the tokens of its single (ASCII) bytes.

use fancy_regex::Regex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// The pre-tokenizer of `tokenizer.ggml.pre`: its expressions and whether a word that is a
/// token as a whole skips the merges (llama.cpp's `ignore_merges`). None for names this
/// crate does not know (better refused than tokenized differently from llama.cpp).
fn pre_tokenizer(pre: &str) -> Option<(&'static [&'static str], bool)> {
    const GPT2: &[&str] = &["'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"];
    const LLAMA3: &[&str] = &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ];
    const QWEN2: &[&str] = &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ];
    // Written with escapes: these ranges hold characters that Unicode normalization
    // would change (U+1FD3 is canonically U+0390), which would turn a range inside out.
    const DEEPSEEK_LLM: &[&str] = &[
        "[\\r\\n]",
        "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
        "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
        "\\s+$",
        "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
        "\\p{N}+",
    ];
    const DEEPSEEK_CODER: &[&str] =
        &["[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+", "\\p{N}"];
    const DEEPSEEK_V3: &[&str] = &[
        "\\p{N}{1,3}",
        "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ];
    const GPT4O: &[&str] = &[
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ];
    const STARCODER: &[&str] =
        &["\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"];
    const FALCON: &[&str] = &[
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ];
    const QWEN35: &[&str] = &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ];
    Some(match pre {
        "default" | "" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (GPT2, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (LLAMA3, true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (QWEN2, false),
        "qwen35" => (QWEN35, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva" => (STARCODER, false),
        "falcon" => (FALCON, false),
        "deepseek-llm" => (DEEPSEEK_LLM, false),
        "deepseek-coder" => (DEEPSEEK_CODER, false),
        "deepseek-v3" => (DEEPSEEK_V3, false),
        "gpt-4o" | "llama4" => (GPT4O, false),
        _ => return None,
    })
}

/// GPT-2's table: the printable Latin-1 bytes stand for themselves, the others for the
/// characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// A byte-level BPE vocabulary's merge table and pre-tokenizer.
pub(crate) struct Bpe {
    pre: Vec<Regex>,
    ignore_merges: bool,
    /// Symbol texts: the vocabulary's tokens first (ids below `n_vocab`), then strings
    /// that appear in merges but are not tokens.
    symbols: Vec<String>,
    symbol_ids: HashMap<String, u32>,
    n_vocab: u32,
    /// (left symbol, right symbol) → (rank, merged symbol).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
}

impl Bpe {
    /// From the vocabulary's token texts, its `tokenizer.ggml.merges` (`"left right"`,
    /// highest priority first) and its pre-tokenizer name.
    pub(crate) fn new(tokens: &[String], merges: &[String], pre: &str) -> Result<Bpe, String> {
        let (exprs, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| format!("unknown pre-tokenizer {pre:?}"))?;
        let pre = exprs
            .iter()
            .map(|e| Regex::new(e).map_err(|err| format!("pre-tokenizer {e:?}: {err}")))
            .collect::<Result<Vec<_>, _>>()?;
        let n_vocab = u32::try_from(tokens.len()).map_err(|_| "too many tokens".to_string())?;
        let mut symbol_ids: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // The first id of a text wins, as llama.cpp's token_to_id map keeps it.
            symbol_ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut bpe = Bpe {
            pre,
            ignore_merges,
            symbols: tokens.to_vec(),
            symbol_ids,
            n_vocab,
            merges: HashMap::with_capacity(merges.len()),
            byte_chars: byte_chars(),
            char_bytes: HashMap::new(),
        };
        bpe.char_bytes = bpe.byte_chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first character.
            let Some(first_len) = m.chars().next().map(char::len_utf8) else { continue };
            let Some(space) = m[first_len..].find(' ').map(|i| i + first_len) else { continue };
            let (left, right) = (&m[..space], &m[space + 1..]);
            let (l, r, merged) = (bpe.intern(left), bpe.intern(right), bpe.intern(&format!("{left}{right}")));
            // An earlier (better) rank for the same pair wins.
            bpe.merges.entry((l, r)).or_insert((rank as u32, merged));
        }
        Ok(bpe)
    }

    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&id) = self.symbol_ids.get(text) {
            return id;
        }
        let id = self.symbols.len() as u32;
        self.symbols.push(text.to_string());
        self.symbol_ids.insert(text.to_string(), id);
        id
    }

    /// The pre-tokenizer's words of `text`, in order (matches and the gaps between them).
    pub(crate) fn words<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.pre {
            let mut next = Vec::with_capacity(pieces.len());
            for piece in pieces {
                let mut at = 0;
                for m in re.find_iter(piece).flatten() {
                    if m.start() > at {
                        next.push(&piece[at..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    at = m.end();
                }
                if at < piece.len() {
                    next.push(&piece[at..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Appends the tokens of `text` (no special tokens in it) to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        for word in self.words(text) {
            let spelled: String = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
            self.encode_word(&spelled, out);
        }
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(&id) = self.symbol_ids.get(word).filter(|&&id| id < self.n_vocab) {
                out.push(id);
                return;
            }
        }
        // One symbol per character; `next` links the live ones.
        let mut syms: Vec<u32> = Vec::new();
        let mut chars = word.char_indices().peekable();
        while let Some((i, _)) = chars.next() {
            let end = chars.peek().map_or(word.len(), |&(j, _)| j);
            syms.push(self.symbol_ids.get(&word[i..end]).copied().unwrap_or(u32::MAX));
        }
        let n = syms.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut alive = vec![true; n];
        // Min-heap on (rank, left position); each entry remembers the pair it was made for.
        let mut queue = BinaryHeap::new();
        let pair = |syms: &[u32], l: usize, r: usize| self.merges.get(&(syms[l], syms[r])).copied();
        for l in 0..n.saturating_sub(1) {
            if let Some((rank, _)) = pair(&syms, l, l + 1) {
                queue.push(Reverse((rank, l, syms[l], syms[l + 1])));
            }
        }
        while let Some(Reverse((_, l, ls, rs))) = queue.pop() {
            let r = next[l];
            if !alive[l] || r >= n || syms[l] != ls || syms[r] != rs {
                continue; // stale: one side has changed since this entry was queued
            }
            let Some((_, merged)) = self.merges.get(&(ls, rs)).copied() else { continue };
            syms[l] = merged;
            alive[r] = false;
            next[l] = next[r];
            if next[l] < n {
                prev[next[l]] = Some(l);
            }
            if let Some(p) = prev[l] {
                if let Some((rk, _)) = pair(&syms, p, l) {
                    queue.push(Reverse((rk, p, syms[p], syms[l])));
                }
            }
            if next[l] < n {
                let nl = next[l];
                if let Some((rk, _)) = pair(&syms, l, nl) {
                    queue.push(Reverse((rk, l, syms[l], syms[nl])));
                }
            }
        }
        let mut i = 0;
        while i < n {
            self.push_symbol(syms[i], word, out);
            i = next[i];
        }
    }

    /// A symbol's token, or the tokens of its ASCII bytes when the vocabulary lacks it
    /// (llama.cpp looks each byte of the spelled text up as a one-byte string).
    fn push_symbol(&self, sym: u32, word: &str, out: &mut Vec<u32>) {
        if sym < self.n_vocab {
            out.push(sym);
            return;
        }
        let text = self.symbols.get(sym as usize).map_or(word, |s| s.as_str());
        for b in text.bytes().filter(u8::is_ascii) {
            if let Some(&id) = self.symbol_ids.get(&(b as char).to_string()).filter(|&&id| id < self.n_vocab) {
                out.push(id);
            }
        }
    }

    /// The bytes a normal token's spelled text stands for.
    pub(crate) fn unspell(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.char_bytes.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_table() {
        let t = byte_chars();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0xAD], '\u{143}');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn every_pre_tokenizer_compiles_and_splits_as_its_expressions_say() {
        let tokens = vec!["a".to_string()];
        for pre in [
            "default",
            "llama-bpe",
            "qwen2",
            "qwen35",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "gpt-4o",
            "starcoder",
            "falcon",
        ] {
            assert!(Bpe::new(&tokens, &[], pre).is_ok(), "{pre}");
        }
        // Untested against llama.cpp's files (none ships for these): checked by hand.
        let o200k = Bpe::new(&tokens, &[], "gpt-4o").unwrap();
        assert_eq!(o200k.words("Hello world 12345!!\n"), ["Hello", " world", " ", "123", "45", "!!\n"]);
        assert_eq!(o200k.words("I'm HTTPServer"), ["I'm", " HTTPServer"]);
        let v3 = Bpe::new(&tokens, &[], "deepseek-v3").unwrap();
        assert_eq!(v3.words("Hello 12345"), ["Hello", " ", "123", "45"]);
        assert_eq!(v3.words("(abc 中文"), ["(abc", " ", "中文"]);
    }

    #[test]
    fn merges_lowest_rank_first() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "Ġ"].iter().map(|s| s.to_string()).collect();
        let merges: Vec<String> = ["b c", "a b", "a bc"].iter().map(|s| s.to_string()).collect();
        let bpe = Bpe::new(&tokens, &merges, "gpt2").unwrap();
        let mut out = vec![];
        bpe.encode("abc", &mut out);
        assert_eq!(out, vec![5], "b c first, then a bc");
        out.clear();
        bpe.encode("ab cab", &mut out);
        // "ab" | " cab" → ab, Ġ c a b → Ġ, c, ab
        assert_eq!(out, vec![3, 6, 2, 3]);
        assert!(Bpe::new(&tokens, &merges, "no-such-pre").is_err());
    }
}
