//! The tokenizer of a GGUF file: `tokenizer.ggml.*` rebuilt as a Hugging Face byte-level BPE tokenizer, and the
//! inverse for export.

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use super::{value_as_u64, GgufFile};
use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::error::{MorError, Result};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

impl GgufFile {
    /// The tokenizer described by `tokenizer.ggml.*` as a Hugging Face `tokenizer.json` value (GPT-2 byte-level BPE
    /// only; `tokenizer.ggml.pre` selects the pre-tokenizer as llama.cpp does).
    pub fn tokenizer_json(&self) -> Result<serde_json::Value> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.err(format!(
                "tokenizer.ggml.model = {model:?}: only GPT-2 byte-level BPE (\"gpt2\") is supported"
            )));
        }
        let tokens = self.array("tokenizer.ggml.tokens")?;
        let merges = self.array("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => self
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x),
                    other => value_as_u64(other)
                        .map(|x| x as i32)
                        .ok_or_else(|| self.err("tokenizer.ggml.token_type: expected integers")),
                })
                .collect::<Result<_>>()?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(self.err(format!(
                "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            let Value::String(s) = tok else {
                return Err(self.err(format!("tokenizer.ggml.tokens[{id}]: expected a string")));
            };
            if vocab.insert(s.clone(), json!(id)).is_some() {
                return Err(self.err(format!(
                    "tokenizer.ggml.tokens: token {s:?} appears twice (second at id {id})"
                )));
            }
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL
                }));
            }
        }
        let merges: Vec<String> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                Value::String(s) if s.split_once(' ').is_some() => Ok(s.clone()),
                _ => Err(self.err(format!(
                    "tokenizer.ggml.merges[{i}]: expected a string \"left right\""
                ))),
            })
            .collect::<Result<_>>()?;
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre = match self.content.metadata.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => self.string("tokenizer.ggml.pre")?,
        };
        // llama.cpp's SMOLLM/STARCODER pre-tokenizers split every digit, then apply the GPT-2 regex.
        let pre_tokenizer = match pre {
            "default" | "gpt-2" | "gpt2" => byte_level.clone(),
            "smollm" | "starcoder" | "refact" | "codeshell" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level.clone()]
            }),
            other => {
                return Err(self.err(format!(
                    "tokenizer.ggml.pre = {other:?}: unsupported pre-tokenizer (supported: default, gpt-2, smollm, starcoder)"
                )))
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        }))
    }

    /// The tokenizer stored in the file.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let j = self.tokenizer_json()?;
        let inner = tokenizers::Tokenizer::from_bytes(j.to_string().as_bytes())
            .map_err(|e| self.err(format!("building the tokenizer from tokenizer.ggml.*: {e}")))?;
        Tokenizer::from_inner(inner).map_err(|e| self.err(e.to_string()))
    }
}

/// `tokenizer.ggml.*` entries for a byte-level BPE tokenizer.
pub(super) fn tokenizer_metadata(
    tok: &Tokenizer,
    cfg: &ModelConfig,
) -> Result<Vec<(String, Value)>> {
    let j: serde_json::Value = serde_json::from_str(&tok.to_json()?)
        .map_err(|e| MorError::Data(format!("tokenizer JSON: {e}")))?;
    let model = &j["model"];
    if model["type"] != "BPE" {
        return Err(MorError::Data(
            "GGUF export: only BPE tokenizers can be written".into(),
        ));
    }
    let n = tok.vocab_size();
    if n > cfg.vocab_size {
        return Err(MorError::Data(format!(
            "GGUF export: the tokenizer has {n} tokens, the model only {}",
            cfg.vocab_size
        )));
    }
    let mut tokens = vec![String::new(); cfg.vocab_size];
    let mut types = vec![TOKEN_TYPE_NORMAL; cfg.vocab_size];
    for (id, slot) in tokens.iter_mut().enumerate() {
        // Rows of the embedding beyond the tokenizer get placeholder names llama.cpp accepts.
        *slot = tok
            .id_to_token(id as u32)
            .unwrap_or_else(|| format!("[PAD{id}]"));
    }
    if let Some(added) = j["added_tokens"].as_array() {
        for a in added {
            if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < types.len()) {
                types[id as usize] = if a["special"] == true {
                    TOKEN_TYPE_CONTROL
                } else {
                    TOKEN_TYPE_USER_DEFINED
                };
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) if p.len() == 2 => Some(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or_default(),
                        p[1].as_str().unwrap_or_default()
                    )),
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let uses_digits = j["pre_tokenizer"].to_string().contains("Digits");
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(if uses_digits { "smollm" } else { "gpt-2" }.into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(cfg.eos_token_id.unwrap_or(tok.eos_id())),
        ),
    ];
    if let Some(b) = cfg.bos_token_id {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    Ok(out)
}
