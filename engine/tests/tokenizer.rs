//! Tokenizer tests.
//!
//! - Reference fixtures: ids produced by llama.cpp on the real Gemma 3 270M model
//!   (`fixtures/tokenizer/*.json`), compared entry by entry when the model is present.
//! - Hand-made vocabularies that pin each rule of llama.cpp's SPM tokenizer: merge order,
//!   byte fallback, special-token splitting, space prefix, BOS/EOS, detokenizing.
//! - GGUF loading errors, and hostile vocabularies and inputs that must not panic.

use std::path::PathBuf;
use std::time::Instant;

use turbine_engine::gguf::Gguf;
use turbine_engine::tokenizer::{token_type as tt, StreamDecoder, Tokenizer, TokenizerError, Vocab};

// ---------------------------------------------------------------------------------------
// Hand-made vocabularies
// ---------------------------------------------------------------------------------------

/// A vocabulary from (text, score, type) triples; ids are positions.
fn vocab(entries: &[(&str, f32, i32)]) -> Vocab {
    Vocab::new(
        entries.iter().map(|e| e.0.to_string()).collect(),
        entries.iter().map(|e| e.1).collect(),
        entries.iter().map(|e| e.2).collect(),
    )
}

/// Vocab with the llama defaults at 0..3, a few merges and a full set of byte tokens.
fn small_entries() -> Vec<(String, f32, i32)> {
    let mut e: Vec<(String, f32, i32)> =
        vec![("<unk>".into(), 0.0, tt::UNKNOWN), ("<s>".into(), 0.0, tt::CONTROL), ("</s>".into(), 0.0, tt::CONTROL)];
    for b in 0..=255u8 {
        e.push((format!("<0x{b:02X}>"), 0.0, tt::BYTE));
    }
    for (t, s) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("c", -2.0),
        ("h", -2.0),
        ("i", -2.0),
        ("ab", -5.0),
        ("bc", -4.0),
        ("abc", -3.0),
        ("▁h", -6.0),
        ("hi", -3.0),
        ("▁hi", -1.5),
    ] {
        e.push((t.into(), s, tt::NORMAL));
    }
    e
}

fn small_vocab() -> Vocab {
    let e = small_entries();
    Vocab::new(
        e.iter().map(|x| x.0.clone()).collect(),
        e.iter().map(|x| x.1).collect(),
        e.iter().map(|x| x.2).collect(),
    )
}

fn small() -> Tokenizer {
    Tokenizer::from_vocab(small_vocab()).unwrap()
}

fn texts(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| t.token_text(i).unwrap_or("?").to_string()).collect()
}

#[test]
fn highest_score_pair_merges_first() {
    let t = small();
    // "▁abc": "bc" (-4) beats "ab" (-5), then "a" + "bc" forms "abc" (-3).
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["▁", "abc"]);
    // Without "abc": the better pair wins even though it is not leftmost.
    let mut v = vocab(&[("a", 0.0, 1), ("b", 0.0, 1), ("c", 0.0, 1), ("ab", -5.0, 1), ("bc", -4.0, 1)]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["a", "bc"]);
}

#[test]
fn equal_scores_merge_leftmost_first() {
    let mut v = vocab(&[("a", 0.0, 1), ("b", 0.0, 1), ("c", 0.0, 1), ("ab", -1.0, 1), ("bc", -1.0, 1)]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["ab", "c"]);
    // Scores, not lengths, decide: a long token with a low score loses to a short pair.
    let mut v =
        vocab(&[("a", 0.0, 1), ("b", 0.0, 1), ("c", 0.0, 1), ("ab", -10.0, 1), ("bc", -1.0, 1), ("abc", 5.0, 1)]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["abc"]);
    assert_eq!(texts(&t, &t.encode("abcabc", false, false)), ["abc", "abc"]);
}

#[test]
fn unknown_characters_fall_back_to_bytes() {
    let t = small();
    let ids = t.encode("é", false, false);
    assert_eq!(texts(&t, &ids), ["▁", "<0xC3>", "<0xA9>"]);
    assert_eq!(t.decode(&ids), "é");
    // Emoji: four bytes.
    let ids = t.encode("a😀", false, false);
    assert_eq!(texts(&t, &ids), ["▁", "a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]);
}

#[test]
fn unknown_characters_without_byte_tokens_become_unk() {
    let mut v = vocab(&[("<unk>", 0.0, tt::UNKNOWN), ("a", 0.0, 1)]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(t.encode("aéa", false, false), [1, 0, 0, 1]);
    // No unk either: the bytes are dropped rather than panicking.
    let mut v = vocab(&[("a", 0.0, 1)]);
    v.add_space_prefix = false;
    v.special.unk = None;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(t.encode("aéa", false, false), [0, 0]);
}

#[test]
fn space_prefix_and_bos_eos() {
    let t = small();
    let hi = t.token_id("▁hi").unwrap();
    assert_eq!(t.encode("hi", false, false), [hi]);
    assert_eq!(t.encode("hi", true, false), [1, hi]);
    assert_eq!(t.encode("", true, false), [1]);
    assert_eq!(t.encode("", false, false), Vec::<u32>::new());
    let mut v = small_vocab();
    v.add_eos = true;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(t.encode("hi", true, false), [1, hi, 2]);
    let mut v = small_vocab();
    v.add_space_prefix = false;
    v.add_bos = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(texts(&t, &t.encode("hi", true, false)), ["hi"]);
    // "hi" (-3) forms before "▁h" (-6) could, then "▁hi" (-1.5).
    assert_eq!(texts(&t, &t.encode(" hi", true, false)), ["▁hi"]);
}

#[test]
fn space_prefix_follows_special_tokens_only() {
    let t = small();
    // "</s>" is control: split out when parsing specials; text after it gets a prefix.
    let ids = t.encode("hi</s>hi", false, true);
    assert_eq!(texts(&t, &ids), ["▁hi", "</s>", "▁hi"]);
    // Not parsed: "</s>" is ordinary text, spelled with byte tokens here.
    let ids = t.encode("hi</s>", false, false);
    assert_eq!(texts(&t, &ids)[0], "▁hi");
    assert_eq!(t.decode(&ids), "hi</s>");
}

#[test]
fn control_tokens_split_only_when_parsing_specials_user_defined_always() {
    let mut e = small_entries();
    e.push(("<ctl>".into(), 0.0, tt::CONTROL));
    e.push(("<usr>".into(), 0.0, tt::USER_DEFINED));
    let mut v = Vocab::new(
        e.iter().map(|x| x.0.clone()).collect(),
        e.iter().map(|x| x.1).collect(),
        e.iter().map(|x| x.2).collect(),
    );
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    let ctl = t.token_id("<ctl>").unwrap();
    let usr = t.token_id("<usr>").unwrap();
    let ids = t.encode("a<ctl>b<usr>c", false, true);
    assert_eq!(texts(&t, &ids), ["a", "<ctl>", "b", "<usr>", "c"]);
    let ids = t.encode("a<ctl>b<usr>c", false, false);
    assert!(!ids.contains(&ctl));
    assert!(ids.contains(&usr));
    assert_eq!(t.decode(&ids), "a<ctl>b<usr>c");
}

#[test]
fn specials_split_longest_first_not_leftmost() {
    // llama.cpp cuts each special token in turn, longest first, so "bcd" is cut out of
    // "abcd" before "ab" is looked for, even though "ab" starts further left.
    let mut v = vocab(&[
        ("a", 0.0, 1),
        ("b", 0.0, 1),
        ("c", 0.0, 1),
        ("d", 0.0, 1),
        ("ab", 0.0, tt::USER_DEFINED),
        ("bcd", 0.0, tt::USER_DEFINED),
    ]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(texts(&t, &t.encode("abcd", false, false)), ["a", "bcd"]);
    assert_eq!(texts(&t, &t.encode("abab", false, false)), ["ab", "ab"]);
    // Non-overlapping occurrences, left to right.
    assert_eq!(texts(&t, &t.encode("bcdbcd", false, false)), ["bcd", "bcd"]);
}

#[test]
fn repeated_special_runs_split_greedily() {
    // Like Gemma's newline-run tokens: the longest run first, then what is left.
    let mut v = vocab(&[
        ("x", 0.0, 1),
        ("\n", 0.0, tt::USER_DEFINED),
        ("\n\n", 0.0, tt::USER_DEFINED),
        ("\n\n\n", 0.0, tt::USER_DEFINED),
    ]);
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    assert_eq!(t.encode("\n\n\n\n\n", false, false), [3, 2]);
    assert_eq!(t.encode("x\n\n\n\n\n\n\nx", false, false), [0, 3, 3, 1, 0]);
}

#[test]
fn rstrip_tokens_swallow_following_whitespace_for_phi3() {
    let mut e = small_entries();
    e.push(("<|user|>".into(), 0.0, tt::CONTROL));
    let mut v = Vocab::new(
        e.iter().map(|x| x.0.clone()).collect(),
        e.iter().map(|x| x.1).collect(),
        e.iter().map(|x| x.2).collect(),
    );
    let plain = Tokenizer::from_vocab(v.clone()).unwrap();
    v.model_name = "Phi-3 mini".into();
    let phi = Tokenizer::from_vocab(v).unwrap();
    let a = plain.encode("<|user|> \nhi", false, true);
    let b = phi.encode("<|user|> \nhi", false, true);
    assert_eq!(texts(&phi, &b), ["<|user|>", "▁hi"]);
    assert!(a.len() > b.len());
}

#[test]
fn pieces_render_by_token_type() {
    let mut e = small_entries();
    e.push(("<ctl>".into(), 0.0, tt::CONTROL));
    e.push(("▁<usr>".into(), 0.0, tt::USER_DEFINED));
    e.push(("<unused>".into(), 0.0, tt::UNUSED));
    e.push(("▁hello▁world".into(), 0.0, tt::NORMAL));
    let v = Vocab::new(e.iter().map(|x| x.0.clone()).collect(), vec![], e.iter().map(|x| x.2).collect());
    let t = Tokenizer::from_vocab(v).unwrap();
    let id = |s: &str| t.token_id(s).unwrap();
    assert_eq!(t.token_to_piece(id("<ctl>")), b"");
    assert_eq!(t.token_to_piece_with(id("<ctl>"), true), b"<ctl>");
    assert_eq!(t.token_to_piece(id("<unk>")), b"");
    // User-defined: literal text, U+2581 not unescaped.
    assert_eq!(t.token_to_piece(id("▁<usr>")), "▁<usr>".as_bytes());
    assert_eq!(t.token_to_piece(id("<unused>")), b"");
    assert_eq!(t.token_to_piece(id("▁hello▁world")), b" hello world");
    assert_eq!(t.token_to_piece(id("<0x0A>")), b"\n");
    assert_eq!(t.token_to_piece(id("<0xFF>")), [0xFF]);
    assert_eq!(t.token_to_piece(999_999), b"");
}

#[test]
fn detokenize_strips_the_prefix_space_like_llama_cpp() {
    let t = small();
    let ids = t.encode("hi hi", false, false);
    assert_eq!(t.decode(&ids), "hi hi");
    // After a BOS the first text piece is not the first piece: its space stays.
    let ids = t.encode("hi", true, false);
    assert_eq!(t.decode(&ids), " hi");
    // llama.cpp also keeps the space when it removes that BOS.
    assert_eq!(t.detokenize(&ids, true, false), b" hi");
    assert_eq!(t.decode(&ids[1..]), "hi");
    assert_eq!(t.detokenize(&ids, false, true), b"<s> hi");
}

#[test]
fn round_trip_through_byte_tokens() {
    let mut v = small_vocab();
    v.add_space_prefix = false;
    let t = Tokenizer::from_vocab(v).unwrap();
    for s in ["abc hi", "日本語 é 😀 a\tb\n", "\u{10FFFF}\u{0}x", "  lots   of   space  "] {
        assert_eq!(t.decode(&t.encode(s, false, false)), s, "{s:?}");
    }
}

#[test]
fn stream_decoder_never_splits_characters() {
    let text = "aé日😀b";
    let bytes = text.as_bytes();
    let mut d = StreamDecoder::new();
    let mut out = String::new();
    let mut emitted = Vec::new();
    for b in bytes {
        let s = d.push(std::slice::from_ref(b));
        emitted.push(s.clone());
        out.push_str(&s);
    }
    out.push_str(&d.finish());
    assert_eq!(out, text);
    // Each push yields whole characters only: nothing until a character completes.
    assert_eq!(emitted, ["a", "", "é", "", "", "日", "", "", "", "😀", "b"]);

    // Through a tokenizer: byte tokens streamed one by one.
    let t = small();
    let ids = t.encode("é😀", false, false);
    let mut d = StreamDecoder::new();
    let streamed: String = ids.iter().map(|&id| d.push(&t.token_to_piece(id))).collect();
    assert_eq!(streamed, " é😀");
    assert!(d.pending().is_empty());
}

#[test]
fn stream_decoder_matches_lossy_decoding_on_bad_bytes() {
    let cases: [&[u8]; 5] = [b"\xff", b"a\xc3", b"\xe6\x97x", b"\xf0\x9f\x98", b"ok\xed\xa0\x80ok"];
    for bytes in cases {
        for split in 0..=bytes.len() {
            let mut d = StreamDecoder::new();
            let mut out = d.push(&bytes[..split]);
            out += &d.push(&bytes[split..]);
            out += &d.finish();
            assert_eq!(out, String::from_utf8_lossy(bytes), "{bytes:?} split at {split}");
        }
    }
}

#[test]
fn eog_set_follows_llama_cpp() {
    let v = vocab(&[
        ("<unk>", 0.0, tt::UNKNOWN),
        ("<s>", 0.0, tt::CONTROL),
        ("</s>", 0.0, tt::CONTROL),
        ("<end_of_turn>", 0.0, tt::NORMAL),
        ("<|im_end|>", 0.0, tt::USER_DEFINED),
        ("hello", 0.0, tt::NORMAL),
    ]);
    let t = Tokenizer::from_vocab(v).unwrap();
    let eog: Vec<u32> = t.eog_ids().collect();
    assert_eq!(eog, [2, 3, 4]);
    // The first end-of-turn text found becomes EOT, and is promoted to control.
    assert_eq!(t.eot(), Some(3));
    assert!(t.is_control(3) && t.is_control(4));
    assert_eq!(t.token_to_piece(3), b"");
    assert!(!t.is_eog(5) && !t.is_eog(1));

    // Harmony: <|end|> is not an end when <|return|> and <|call|> exist.
    let v = vocab(&[
        ("<|return|>", 0.0, tt::CONTROL),
        ("<|call|>", 0.0, tt::CONTROL),
        ("<|end|>", 0.0, tt::CONTROL),
        ("<|endoftext|>", 0.0, tt::CONTROL),
    ]);
    let t = Tokenizer::from_vocab(v).unwrap();
    assert!(t.is_eog(0) && t.is_eog(1) && !t.is_eog(2) && t.is_eog(3));
    assert_eq!(t.token_to_piece(2), b"<|end|>");
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
}

#[test]
fn vocabulary_errors_name_the_key() {
    let err = |v: Vocab| Tokenizer::from_vocab(v).unwrap_err().to_string();
    assert!(err(Vocab::new(vec![], vec![], vec![])).contains("tokenizer.ggml.tokens"));
    let e = err(Vocab::new(vec!["a".into(), "b".into()], vec![0.0], vec![]));
    assert!(e.contains("tokenizer.ggml.scores") && e.contains("1 scores for 2"), "{e}");
    let e = err(Vocab::new(vec!["a".into(), "b".into()], vec![], vec![1]));
    assert!(e.contains("tokenizer.ggml.token_type"), "{e}");
    let mut v = Vocab::new(vec!["a".into(), "b".into()], vec![], vec![]);
    v.special.eos = Some(7);
    let e = err(v);
    assert!(e.contains("tokenizer.ggml.eos_token_id") && e.contains('7'), "{e}");
}

// ---------------------------------------------------------------------------------------
// GGUF loading
// ---------------------------------------------------------------------------------------

/// Minimal GGUF v3 writer: metadata only, no tensors.
enum Kv<'a> {
    Str(&'a str),
    U32(u32),
    Bool(bool),
    Strs(&'a [&'a str]),
    F32s(&'a [f32]),
    I32s(&'a [i32]),
}

fn gguf_bytes(kvs: &[(&str, Kv)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (key, v) in kvs {
        string(&mut out, key);
        match v {
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(*b as u8);
            }
            Kv::Strs(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|s| string(&mut out, s));
            }
            Kv::F32s(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Kv::I32s(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out
}

fn load(kvs: &[(&str, Kv)]) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&Gguf::from_bytes(gguf_bytes(kvs)).expect("test file parses"))
}

const TOKS: &[&str] = &["<pad>", "<eos>", "<bos>", "<unk>", "▁", "h", "i", "hi", "▁hi"];

#[test]
fn gguf_vocabulary_loads_with_its_flags() {
    let t = load(&[
        ("tokenizer.ggml.model", Kv::Str("llama")),
        ("tokenizer.ggml.tokens", Kv::Strs(TOKS)),
        ("tokenizer.ggml.scores", Kv::F32s(&[0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -1.0, -3.0])),
        ("tokenizer.ggml.token_type", Kv::I32s(&[3, 3, 3, 2, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.bos_token_id", Kv::U32(2)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.unknown_token_id", Kv::U32(3)),
        ("tokenizer.ggml.padding_token_id", Kv::U32(0)),
        ("tokenizer.ggml.add_space_prefix", Kv::Bool(false)),
    ])
    .unwrap();
    assert_eq!((t.bos(), t.eos(), t.unk(), t.pad()), (Some(2), Some(1), Some(3), Some(0)));
    assert!(t.add_bos() && !t.add_eos() && !t.add_space_prefix());
    assert_eq!(t.encode("hi", true, true), [2, 7]);
    assert_eq!(t.encode(" hi", true, true), [2, 8]);
    assert!(t.is_eog(1) && !t.is_eog(2));

    // Defaults: space prefix on, BOS 1 / EOS 2 / UNK 0, scores all zero.
    let t = load(&[("tokenizer.ggml.model", Kv::Str("llama")), ("tokenizer.ggml.tokens", Kv::Strs(TOKS))]).unwrap();
    assert!(t.add_space_prefix());
    assert_eq!((t.bos(), t.eos(), t.unk()), (Some(1), Some(2), Some(0)));
    assert_eq!(t.encode("hi", false, false), [8]);
}

#[test]
fn gguf_errors_name_the_key() {
    let msg = |kvs: &[(&str, Kv)]| load(kvs).unwrap_err().to_string();
    let e = msg(&[("tokenizer.ggml.tokens", Kv::Strs(TOKS))]);
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
    // A byte-level BPE vocabulary needs its merges; an unknown pre-tokenizer is refused
    // rather than guessed at; Gemma 4's BPE is not supported yet.
    let e = msg(&[("tokenizer.ggml.model", Kv::Str("gpt2")), ("tokenizer.ggml.tokens", Kv::Strs(TOKS))]);
    assert!(e.contains("missing") && e.contains("tokenizer.ggml.merges"), "{e}");
    let e = msg(&[
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.tokens", Kv::Strs(TOKS)),
        ("tokenizer.ggml.merges", Kv::Strs(&["a b"])),
        ("tokenizer.ggml.pre", Kv::Str("no-such-pre")),
    ]);
    assert!(e.contains("tokenizer.ggml.pre") && e.contains("no-such-pre"), "{e}");
    let e = msg(&[("tokenizer.ggml.model", Kv::Str("gemma4")), ("tokenizer.ggml.tokens", Kv::Strs(TOKS))]);
    assert!(e.contains("gemma4") && e.contains("not yet supported"), "{e}");
    let e = msg(&[("tokenizer.ggml.model", Kv::Str("llama"))]);
    assert!(e.contains("missing") && e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = msg(&[
        ("tokenizer.ggml.model", Kv::Str("llama")),
        ("tokenizer.ggml.tokens", Kv::Strs(TOKS)),
        ("tokenizer.ggml.scores", Kv::F32s(&[0.0; 3])),
    ]);
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let e = msg(&[
        ("tokenizer.ggml.model", Kv::Str("llama")),
        ("tokenizer.ggml.tokens", Kv::Strs(TOKS)),
        ("tokenizer.ggml.bos_token_id", Kv::U32(9)),
    ]);
    assert!(e.contains("tokenizer.ggml.bos_token_id") && e.contains('9'), "{e}");
    let e = msg(&[("tokenizer.ggml.model", Kv::Str("llama")), ("tokenizer.ggml.tokens", Kv::U32(5))]);
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Hostile vocabularies and inputs
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn text(&mut self, alphabet: &[&str], max: usize) -> String {
        (0..self.below(max + 1)).map(|_| alphabet[self.below(alphabet.len())]).collect()
    }
}

#[test]
fn hostile_vocabularies_and_inputs_do_not_panic() {
    let alphabet = ["a", "b", " ", "▁", "\n", "<", ">", "é", "😀", "\u{0}", "ab", "<x>", "\t"];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..200 {
        let n = 1 + rng.below(40);
        // Duplicate and empty texts, odd types, NaN and infinite scores.
        let tokens: Vec<String> = (0..n).map(|_| rng.text(&alphabet, 4)).collect();
        let scores: Vec<f32> = (0..n)
            .map(|_| match rng.below(6) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                _ => -(rng.below(100) as f32),
            })
            .collect();
        let types: Vec<i32> = (0..n).map(|_| rng.below(9) as i32 - 1).collect();
        let mut v = Vocab::new(tokens, scores, types);
        v.add_space_prefix = round % 2 == 0;
        v.add_eos = round % 3 == 0;
        v.model_name = if round % 5 == 0 { "phi3".into() } else { String::new() };
        let t = Tokenizer::from_vocab(v).unwrap();
        for _ in 0..20 {
            let s = rng.text(&alphabet, 30);
            for (add, parse) in [(true, true), (false, false)] {
                let ids = t.encode(&s, add, parse);
                assert!(ids.iter().all(|&id| (id as usize) < t.n_vocab()));
                let _ = t.decode(&ids);
                let _ = t.detokenize(&ids, true, true);
            }
        }
        let _ = t.decode(&[u32::MAX, 0, n as u32]);
    }
}

// ---------------------------------------------------------------------------------------
// The real model: llama.cpp reference fixtures
// ---------------------------------------------------------------------------------------

const MODEL_SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TURBINE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let models = std::env::var_os("OLLAMA_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".ollama/models")
    });
    models.join("blobs").join(format!("sha256-{MODEL_SHA}"))
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tokenizer")
}

fn gemma() -> Option<Tokenizer> {
    let path = model_path();
    // A missing model is a failure, not a skip: these checks must run in CI.
    assert!(
        path.exists(),
        "model not found at {}: run scripts/fetch-default-model.sh or set TURBINE_TEST_MODEL",
        path.display()
    );
    let g = Gguf::open(&path).expect("model parses");
    let start = Instant::now();
    let t = Tokenizer::from_gguf(&g).expect("model tokenizer loads");
    eprintln!("tokenizer loaded in {:?}", start.elapsed());
    Some(t)
}

/// One reference case. Files are either `{"meta":..., "cases":[...]}` or a bare array;
/// flags default to what the fixtures were made with (add_special and parse_special on).
struct Case {
    text: String,
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
    /// llama_detokenize(ids, remove_special=false, unparse_special=false), when recorded.
    detok: Option<Vec<u8>>,
}

fn read_cases(path: &PathBuf) -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture readable")).expect("fixture is JSON");
    let list = json.get("cases").unwrap_or(&json).as_array().expect("fixture holds a list of cases");
    let flag = |c: &serde_json::Value, k: &str| c.get(k).and_then(|v| v.as_bool()).unwrap_or(true);
    list.iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("case text").to_string(),
            add_special: flag(c, "add_special"),
            parse_special: flag(c, "parse_special"),
            ids: c["ids"].as_array().expect("case ids").iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            detok: c.get("detok_hex").and_then(|h| h.as_str()).map(unhex),
        })
        .collect()
}

fn unhex(h: &str) -> Vec<u8> {
    (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect()
}

#[test]
fn gemma3_matches_llama_cpp_fixtures() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.starts_with("gemma3-270m") && name.ends_with(".json")
    });
    files.sort();
    // More reference files (same format) from elsewhere, separated by ':'.
    if let Some(extra) = std::env::var_os("TURBINE_TOKENIZER_FIXTURES") {
        files.extend(std::env::split_paths(&extra));
    }
    assert!(!files.is_empty(), "no fixtures/tokenizer/gemma3-270m*.json");
    let Some(t) = gemma() else { return };
    let mut failures = Vec::new();
    let mut n = 0;
    for file in &files {
        for c in read_cases(file) {
            n += 1;
            let got = t.encode(&c.text, c.add_special, c.parse_special);
            if got != c.ids {
                failures.push(format!(
                    "{}: {:?} (add_special={}, parse_special={})\n  want {:?}\n  got  {:?}",
                    file.display(),
                    c.text,
                    c.add_special,
                    c.parse_special,
                    c.ids,
                    got
                ));
            }
            if let Some(want) = c.detok {
                let got = t.detokenize(&c.ids, false, false);
                if got != want {
                    failures.push(format!(
                        "{}: decode of {:?}\n  want {want:?}\n  got  {got:?}",
                        file.display(),
                        c.ids
                    ));
                }
            }
        }
    }
    eprintln!("checked {n} cases from {} file(s)", files.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn gemma3_vocabulary_facts() {
    let Some(t) = gemma() else { return };
    assert_eq!(t.n_vocab(), 262_144);
    assert_eq!((t.bos(), t.eos(), t.unk(), t.pad(), t.eot()), (Some(2), Some(1), Some(3), Some(0), Some(106)));
    assert!(t.add_bos() && !t.add_eos() && !t.add_space_prefix());
    // llama.cpp's EOG set for this model: <eos>, <end_of_turn>, and </s> (matched by text).
    assert_eq!(t.eog_ids().collect::<Vec<_>>(), [1, 106, 212]);
    assert_eq!(t.token_id("<start_of_turn>"), Some(105));
    assert_eq!(t.token_to_piece(105), b"");
    assert_eq!(t.token_to_piece_with(105, true), b"<start_of_turn>");
    assert_eq!(t.encode("", true, true), [2]);
    // Plain text round-trips through decode.
    for s in ["Hello, world!", "  two  spaces\n\n\tand tabs", "日本語 😀 é\u{10FFFF}", "<b>html</b>"] {
        assert_eq!(t.decode(&t.encode(s, false, false)), s);
    }
}

#[test]
fn gemma3_encodes_long_text_round_trip() {
    let Some(t) = gemma() else { return };
    let para = "The quick brown fox jumps over the lazy dog. 日本語のテキスト😀 <start_of_turn>user\n\
                def f(x):\n    return x * 2\n\n";
    let text = para.repeat(2000);
    let start = Instant::now();
    let ids = t.encode(&text, true, true);
    let took = start.elapsed();
    eprintln!("encoded {} bytes into {} tokens in {took:?}", text.len(), ids.len());
    assert_eq!(t.decode(&ids), text.replace("<start_of_turn>", ""));
}
