//! Token ids back to bytes (llama.cpp `token_to_piece` for SPM) and streaming UTF-8.

use super::setup::attr;

/// The bytes token `text` with attributes `a` stands for. Control and unknown tokens are
/// empty unless `render_special`; user-defined ones are their literal text.
pub(crate) fn piece(text: &str, a: u16, render_special: bool) -> Vec<u8> {
    let special = attr::UNKNOWN | attr::CONTROL;
    if a & special != 0 && !render_special {
        return Vec::new();
    }
    if a & (special | attr::USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if a & attr::NORMAL != 0 {
        return text.replace('\u{2581}', " ").into_bytes();
    }
    if a & attr::BYTE != 0 {
        return vec![byte_of(text)];
    }
    // Unused and undefined tokens render as nothing.
    Vec::new()
}

/// The byte a `<0xXX>` token stands for. Like llama.cpp (`strtol` on the two characters
/// after `<0x`), a malformed text yields its leading hex digits, or 0.
fn byte_of(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or(&[]);
    let mut value = 0u8;
    for &d in digits.iter().take(2) {
        match (d as char).to_digit(16) {
            Some(v) => value = (value << 4) | v as u8,
            None => break,
        }
    }
    value
}

/// Turns a stream of token pieces into text without ever splitting a character: bytes of
/// a UTF-8 sequence that is not complete yet are held back until the next push. Invalid
/// bytes become U+FFFD, so the concatenated output of all pushes plus [`finish`] equals
/// `String::from_utf8_lossy` of all the bytes.
///
/// [`finish`]: StreamDecoder::finish
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Add bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // valid_up_to marks a prefix that is valid UTF-8.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[bad..];
                        }
                        // An incomplete sequence at the end: keep it for later.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// End of stream: held-back bytes can no longer complete, so they become U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
