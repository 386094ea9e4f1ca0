//! Reading a [`Vocab`] from GGUF metadata (`tokenizer.ggml.*`). The only code that
//! touches the GGUF reader, so that API changes stay here.

use super::vocab::{BpeSpec, Vocab};
use super::TokenizerError;
use crate::gguf::Gguf;

const MODEL: &str = "tokenizer.ggml.model";
const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const PRE: &str = "tokenizer.ggml.pre";

pub(super) fn read_vocab(g: &Gguf) -> Result<Vocab, TokenizerError> {
    let model = g.get_str(MODEL)?.ok_or(TokenizerError::MissingKey(MODEL))?;
    check_model(model)?;

    let tokens = g.get_str_array(TOKENS)?.ok_or(TokenizerError::MissingKey(TOKENS))?.to_vec();
    // llama.cpp also accepts integer scores.
    let scores = match g.get_f32_array(SCORES) {
        Ok(s) => s.map(<[f32]>::to_vec),
        Err(e) => match g.get_i32_array(SCORES) {
            Ok(s) => s.map(|s| s.iter().map(|&x| x as f32).collect()),
            Err(_) => return Err(e.into()),
        },
    };
    let types = g.get_i32_array(TOKEN_TYPE)?.map(<[i32]>::to_vec);
    let n = tokens.len();
    let mut v = Vocab::new(tokens, scores.unwrap_or_default(), types.unwrap_or_default());
    if model == "gpt2" {
        // llama.cpp's BPE defaults, before the file's own keys: BOS = EOS = 11, no
        // unknown token, no BOS, no space prefix.
        let eleven = (n > 11).then_some(11);
        v.special.bos = eleven;
        v.special.eos = eleven;
        v.special.unk = None;
        v.add_bos = false;
        v.add_space_prefix = false;
        let merges = g.get_str_array(MERGES)?.ok_or(TokenizerError::MissingKey(MERGES))?.to_vec();
        let pre = g.get_str(PRE)?.unwrap_or("default").to_string();
        // Llama 3's pre-tokenizer implies a BOS, as in llama.cpp (the file may still say no).
        if matches!(pre.as_str(), "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral") {
            v.add_bos = true;
        }
        v.bpe = Some(BpeSpec { merges, pre });
    }

    let s = &mut v.special;
    let ids: [(&str, &mut Option<u32>); 14] = [
        ("tokenizer.ggml.bos_token_id", &mut s.bos),
        ("tokenizer.ggml.eos_token_id", &mut s.eos),
        ("tokenizer.ggml.eot_token_id", &mut s.eot),
        ("tokenizer.ggml.eom_token_id", &mut s.eom),
        ("tokenizer.ggml.unknown_token_id", &mut s.unk),
        ("tokenizer.ggml.seperator_token_id", &mut s.sep),
        ("tokenizer.ggml.padding_token_id", &mut s.pad),
        ("tokenizer.ggml.mask_token_id", &mut s.mask),
        ("tokenizer.ggml.fim_pre_token_id", &mut s.fim_pre),
        ("tokenizer.ggml.fim_suf_token_id", &mut s.fim_suf),
        ("tokenizer.ggml.fim_mid_token_id", &mut s.fim_mid),
        ("tokenizer.ggml.fim_pad_token_id", &mut s.fim_pad),
        ("tokenizer.ggml.fim_rep_token_id", &mut s.fim_rep),
        ("tokenizer.ggml.fim_sep_token_id", &mut s.fim_sep),
    ];
    read_ids(g, ids)?;
    // Older spellings of the FIM keys; like llama.cpp, these win when both exist.
    let old_ids = [
        ("tokenizer.ggml.prefix_token_id", &mut s.fim_pre),
        ("tokenizer.ggml.suffix_token_id", &mut s.fim_suf),
        ("tokenizer.ggml.middle_token_id", &mut s.fim_mid),
    ];
    read_ids(g, old_ids)?;

    let flags = [
        ("tokenizer.ggml.add_bos_token", &mut v.add_bos),
        ("tokenizer.ggml.add_eos_token", &mut v.add_eos),
        ("tokenizer.ggml.add_space_prefix", &mut v.add_space_prefix),
    ];
    for (key, slot) in flags {
        if let Some(b) = g.get_bool(key)? {
            *slot = b;
        }
    }
    v.model_name = g.get_str("general.name")?.unwrap_or_default().to_string();
    Ok(v)
}

fn read_ids<const N: usize>(g: &Gguf, ids: [(&str, &mut Option<u32>); N]) -> Result<(), TokenizerError> {
    for (key, slot) in ids {
        if let Some(id) = g.get_u32(key)? {
            *slot = Some(id);
        }
    }
    Ok(())
}

fn check_model(model: &str) -> Result<(), TokenizerError> {
    let reason = match model {
        "llama" | "gpt2" => return Ok(()),
        "gemma4" => "Gemma 4's BPE tokenizer is not yet supported",
        "bert" => "WordPiece is not supported",
        "t5" => "Unigram (T5) is not supported",
        "rwkv" | "plamo2" => "this tokenizer family is not supported",
        "no_vocab" | "none" => "the file has no vocabulary",
        _ => "unknown tokenizer model",
    };
    Err(TokenizerError::Unsupported { model: model.to_string(), reason })
}
