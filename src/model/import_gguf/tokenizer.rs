//! A Hugging Face `tokenizer.json` (the `tokenizers` crate's format) and `tokenizer_config.json`
//! from a GGUF file's tokenizer metadata:
//!
//! | `tokenizer.ggml.model` | tokenizer.json | written by |
//! |---|---|---|
//! | `gpt2` (byte-level BPE: Llama 3, Qwen, SmolLM, Phi-4-mini) | BPE + the pre-tokenizer of `tokenizer.ggml.pre` | this module |
//! | `llama` (SentencePiece: Gemma, Phi-3, Llama 2) | BPE with byte fallback, merges from the scores, `▁` normalizer | [`super::spm_tokenizer`] (tokenizer.json only: the GGUF holds no `tokenizer.model`) |
//!
//! anything else is refused by name. For `gpt2`:
//!
//! - `tokenizer.ggml.tokens` (strings, by id; byte-level form, `Ġ` for a space) and
//!   `tokenizer.ggml.merges` (`"left right"`, by rank) → the BPE model's vocab and merges;
//! - `tokenizer.ggml.token_type`: 3 (control) and 2 (unknown) → special added tokens, 4 (user
//!   defined) → non-special added tokens; 1 (normal), 5 (unused) → vocabulary only;
//! - `tokenizer.ggml.pre` → the pre-tokenizer llama.cpp uses for that name (llama-vocab.cpp),
//!   written the way the original models' `tokenizer.json` write it:
//!
//! | pre | llama.cpp regexes | tokenizer.json pre_tokenizer |
//! |---|---|---|
//! | `gpt2`, `gpt-2` | GPT-2's | ByteLevel (its built-in GPT-2 regex) |
//! | `smollm`, `starcoder` | `\p{N}`, then GPT-2's | Digits(individual) + ByteLevel |
//! | `llama-bpe`, `llama3`, `llama-v3` | Llama 3's | Split(Llama 3 regex, isolated) + ByteLevel(no regex); merges ignored for whole-word tokens |
//! | `default` (or absent) | four: punctuation runs, GPT-2's, `\p{N}+`, `[0-9]{3}` | four isolated Splits + ByteLevel(no regex) |
//! | `gpt-4o` (Phi-4-mini) | GPT-4o's (cased words with their contractions, `\p{N}{1,3}`, punctuation with trailing `/`) | Split(GPT-4o regex as Phi-4-mini's tokenizer.json spells it, isolated) + ByteLevel(no regex) |
//! | `qwen2`, `deepseek-r1-qwen` | Qwen2's (Llama 3's with single digits) | NFC normalizer + Split(Qwen2 regex, isolated) + ByteLevel(no regex), ByteLevel decoder and post-processor, all as Qwen2's and Qwen3's own tokenizer.json |
//!
//!   (llama.cpp does not normalize: text already in NFC, as nearly all text is, tokenizes the
//!   same in both; the regex is written as Qwen's tokenizer.json spells it, `(?i:'s|…)`, where
//!   llama.cpp spells out the cases);
//! - `tokenizer.ggml.add_bos_token` / `add_eos_token` (llama.cpp's defaults: BOS for the Llama 3
//!   names, else none) → a ByteLevel + TemplateProcessing post-processor; otherwise none
//!   (Qwen2's: its ByteLevel one, which only sets offsets);
//! - `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` and `tokenizer.chat_template` →
//!   `tokenizer_config.json`;
//! - a `general.name` naming Phi-3 (llama.cpp's rule) → added tokens that strip the whitespace
//!   after them (`rstrip`), but for `<unk>`, `<s>` and `<|endoftext|>`, as llama.cpp does
//!   (and Phi-3's own tokenizer.json).
//!
//! The result is loaded once with the `tokenizers` crate before it is returned, so a file that
//! is written is a file that loads.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};

use crate::error::Result;
use crate::quant::gguf::{GgufFile, Value};

/// GPT-2's pre-tokenization regex (as llama.cpp writes it).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's (llama.cpp's case-insensitive-free spelling of the tiktoken pattern).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's (o200k), as Phi-4-mini's tokenizer.json writes it (llama.cpp spells the
/// case-insensitive contractions and the letter classes out).
pub(crate) const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (and Qwen3's), as their tokenizer.json writes it: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's regexes for `default`, applied in turn.
const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// The `tokenizer.ggml.pre` names supported.
pub const SUPPORTED_PRE: &str = "gpt2, gpt-2, smollm, starcoder, llama-bpe, llama3, llama-v3, \
     qwen2, deepseek-r1-qwen, gpt-4o, default";

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(super) const NORMAL: i64 = 1;
pub(super) const UNKNOWN: i64 = 2;
pub(super) const CONTROL: i64 = 3;
pub(super) const USER_DEFINED: i64 = 4;

/// The two tokenizer files and a summary.
pub struct TokenizerFiles {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: &'static str,
    /// The `tokenizer.json` document (BPE model, pre-tokenizer, added tokens).
    pub tokenizer_json: Json,
    /// The `tokenizer_config.json` document (BOS/EOS/UNK/PAD tokens, chat template).
    pub tokenizer_config: Json,
    /// `tokenizer.ggml.pre` (`default` when absent).
    pub pre: String,
    /// Tokens in the vocabulary.
    pub tokens: usize,
    /// How many of `tokens` are special (control or unknown) added tokens.
    pub special_tokens: usize,
}

pub(super) fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = g.get(key) else {
        return Ok(None);
    };
    let bad = || g.error(format!("metadata `{key}` must be an array of strings"));
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_str().ok_or_else(bad))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

pub(super) fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<usize>> {
    let Some(v) = g.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as usize)),
        _ => Err(g.error(format!(
            "metadata `{key}` is {v:?}, not a token id below {n_tokens}"
        ))),
    }
}

pub(super) fn flag(g: &GgufFile, key: &str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(g.error(format!("metadata `{key}` is {v:?}, expected a bool"))),
    }
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// Qwen2's ByteLevel (pre-tokenizer after its Split, decoder, post-processor): no prefix space,
/// no offset trimming, no regex.
fn qwen_byte_level() -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// How a `tokenizer.ggml.pre` name is written.
struct Pre {
    /// The `pre_tokenizer`.
    pre_tokenizer: Json,
    /// Whether whole-word vocabulary hits skip the merges (`ignore_merges`).
    ignore_merges: bool,
    /// Whether llama.cpp adds a BOS by default.
    default_bos: bool,
    /// The `normalizer` (null but for Qwen2's NFC).
    normalizer: Json,
    /// Qwen2's ByteLevel as the decoder and (without BOS/EOS to add) as the post-processor, as
    /// its tokenizer.json has them; otherwise the usual decoder and no post-processor.
    qwen: bool,
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Option<Pre> {
    let plain = |pre_tokenizer: Json, ignore_merges: bool, default_bos: bool| Pre {
        pre_tokenizer,
        ignore_merges,
        default_bos,
        normalizer: Json::Null,
        qwen: false,
    };
    Some(match pre {
        "gpt2" | "gpt-2" => plain(byte_level(true), false, false),
        "smollm" | "starcoder" => plain(
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" => plain(
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => Pre {
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                split(QWEN2_REGEX),
                qwen_byte_level(),
            ]}),
            ignore_merges: false,
            default_bos: false,
            normalizer: json!({"type": "NFC"}),
            qwen: true,
        },
        "gpt-4o" => plain(
            json!({"type": "Sequence", "pretokenizers": [split(GPT4O_REGEX), byte_level(false)]}),
            false,
            false,
        ),
        "default" => {
            let mut seq: Vec<Json> = DEFAULT_REGEXES.iter().map(|r| split(r)).collect();
            seq.push(byte_level(false));
            plain(
                json!({"type": "Sequence", "pretokenizers": seq}),
                false,
                false,
            )
        }
        _ => return None,
    })
}

/// A TemplateProcessing that puts `bos` before and `eos` after each sequence (either optional).
pub(super) fn template(bos: Option<&str>, eos: Option<&str>, ids: &HashMap<&str, usize>) -> Json {
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let wrap = |part: &str, type_id: u32| {
        let mut v: Vec<Json> = bos.iter().map(|b| special(b)).collect();
        v.push(json!({"Sequence": {"id": part, "type_id": type_id}}));
        v.extend(eos.iter().map(|e| special(e)));
        v
    };
    let single = wrap("A", 0);
    let mut pair = single.clone();
    pair.extend(wrap("B", 1));
    let mut specials = Map::new();
    for t in bos.iter().chain(eos.iter()) {
        specials.insert(
            t.to_string(),
            json!({"id": t, "ids": [ids[t]], "tokens": [t]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// `tokenizer.ggml.token_type` (all normal when absent), one per token.
pub(super) fn token_types(g: &GgufFile, n: usize) -> Result<Vec<i64>> {
    let Some(v) = g.get("tokenizer.ggml.token_type") else {
        return Ok(vec![NORMAL; n]);
    };
    let bad = || {
        g.error(format!(
            "metadata `tokenizer.ggml.token_type` must be {n} integers, one per token"
        ))
    };
    let a = v.as_array().ok_or_else(bad)?;
    if a.len() != n {
        return Err(bad());
    }
    a.iter().map(|x| x.as_i64().ok_or_else(bad)).collect()
}

/// Whether llama.cpp makes the added tokens of `g` strip the whitespace after them: it does
/// for a model whose `general.name` names Phi-3 (`phi-3`, `phi3`, any case), for every added
/// token but `<unk>`, `<s>` and `<|endoftext|>` (llama-vocab.cpp's token attributes).
fn strips_right(g: &GgufFile) -> impl Fn(&str) -> bool {
    let name = g
        .get("general.name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    move |t: &str| phi3 && !matches!(t, "<unk>" | "<s>" | "<|endoftext|>")
}

/// The added tokens of `g` (control and unknown tokens special, user-defined ones not) and how
/// many are special.
pub(super) fn added_tokens(g: &GgufFile, tokens: &[&str], types: &[i64]) -> (Vec<Json>, usize) {
    let rstrip = strips_right(g);
    let mut added = Vec::new();
    let mut special_tokens = 0;
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        let special = matches!(ty, CONTROL | UNKNOWN);
        if special || ty == USER_DEFINED {
            special_tokens += special as usize;
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": rstrip(t), "normalized": false, "special": special,
            }));
        }
    }
    (added, special_tokens)
}

/// `tokenizer_config.json`: the BOS/EOS/UNK/PAD token strings, whether BOS/EOS are added, the
/// context length and the chat template.
/// Loads `tokenizer_json` once with the `tokenizers` crate: a file that is written is a file that
/// loads.
pub(super) fn check_loads(g: &GgufFile, tokenizer_json: &Json) -> Result<()> {
    let text = serde_json::to_string(tokenizer_json).expect("JSON of plain values");
    tokenizers::Tokenizer::from_str(&text).map_err(|e| {
        g.error(format!(
            "the tokenizer built from the GGUF metadata does not load: {e}"
        ))
    })?;
    Ok(())
}

pub(super) fn config_json(
    g: &GgufFile,
    [bos, eos, unk, pad]: [Option<&str>; 4],
    add_bos: bool,
    add_eos: bool,
    model_max_length: usize,
) -> Result<Json> {
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    });
    if let Some(t) = g.get("tokenizer.chat_template") {
        let t = t
            .as_str()
            .ok_or_else(|| g.error("metadata `tokenizer.chat_template` is not a string"))?;
        config["chat_template"] = json!(t);
    }
    Ok(config)
}

/// Builds both files from `g`'s metadata; `model_max_length` goes into the config. Errors name
/// the file and the key.
pub fn build(g: &GgufFile, model_max_length: usize) -> Result<TokenizerFiles> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| g.error("metadata `tokenizer.ggml.model` is missing (no tokenizer)"))?;
    match model {
        "gpt2" => {}
        "llama" => return super::spm_tokenizer::build(g, model_max_length),
        _ => {
            return Err(g.error(format!(
                "tokenizer.ggml.model is `{model}`: only `gpt2` (byte-level BPE) and `llama` \
                 (SentencePiece) tokenizers can be converted"
            )))
        }
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| g.error("metadata `tokenizer.ggml.tokens` is missing"))?;
    let merges = strings(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| g.error("metadata `tokenizer.ggml.merges` is missing"))?;
    let n = tokens.len();
    let types = token_types(g, n)?;
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let Some(spec) = pre_tokenizer(&pre) else {
        return Err(g.error(format!(
            "tokenizer.ggml.pre is `{pre}`: supported pre-tokenizers are {SUPPORTED_PRE}"
        )));
    };

    let mut vocab = Map::new();
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        if let Some(prev) = ids.insert(t, id) {
            return Err(g.error(format!(
                "tokenizer.ggml.tokens: tokens {prev} and {id} are both {t:?}"
            )));
        }
        vocab.insert((*t).to_string(), json!(id));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (rank, m) in merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(g.error(format!(
                "tokenizer.ggml.merges[{rank}] is {m:?}, not two tokens separated by a space"
            )));
        };
        merge_pairs.push(json!([a, b]));
    }
    let (added, special_tokens) = added_tokens(g, &tokens, &types);

    let name =
        |key: &str| -> Result<Option<&str>> { Ok(token_id(g, key, n)?.map(|id| tokens[id])) };
    let bos = name("tokenizer.ggml.bos_token_id")?;
    let eos = name("tokenizer.ggml.eos_token_id")?;
    let unk = name("tokenizer.ggml.unknown_token_id")?;
    let pad = name("tokenizer.ggml.padding_token_id")?;
    let add_bos = flag(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(spec.default_bos);
    let add_eos = flag(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let missing = |what: &str| {
        g.error(format!(
            "tokenizer.ggml.add_{what}_token is set but there is no {what}_token_id"
        ))
    };
    let bos_added = if add_bos {
        Some(bos.ok_or_else(|| missing("bos"))?)
    } else {
        None
    };
    let eos_added = if add_eos {
        Some(eos.ok_or_else(|| missing("eos"))?)
    } else {
        None
    };
    // Like the original models: no post-processor unless BOS/EOS are added (Qwen2's: a
    // ByteLevel one, which only sets offsets).
    let post = if bos_added.is_some() || eos_added.is_some() {
        json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
            template(bos_added, eos_added, &ids),
        ]})
    } else if spec.qwen {
        qwen_byte_level()
    } else {
        Json::Null
    };
    let decoder = if spec.qwen {
        qwen_byte_level()
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": spec.normalizer,
        "pre_tokenizer": spec.pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            // Every byte is in a byte-level vocabulary: the model never needs an unknown token.
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": spec.ignore_merges,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    });
    check_loads(g, &tokenizer_json)?;

    let config = config_json(g, [bos, eos, unk, pad], add_bos, add_eos, model_max_length)?;
    Ok(TokenizerFiles {
        model: "gpt2",
        tokenizer_json,
        tokenizer_config: config,
        pre,
        tokens: n,
        special_tokens,
    })
}
