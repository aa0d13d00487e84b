//! GGUF import/export: the q/k permutation against an independent implementation (candle-transformers'
//! `quantized_llama`, which applies llama.cpp's interleaved RoPE to the permuted weights), exact round trips,
//! errors that name the field or tensor, and — when `assets/SmolLM2-135M-Instruct.Q4_1.gguf` is present
//! (`scripts/fetch_assets.sh`) — the real SmolLM2 model.

use std::path::{Path, PathBuf};

mod common;
use common::max_abs_diff;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama;

use mor::data::Tokenizer;
use mor::io::gguf::{export_gguf, import_gguf, GgufFile};
use mor::model::{ForwardOptions, MorModel};
use mor::ModelConfig;

const REAL: &str = "assets/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Serialises the tests that run candle's quantized matmuls: `CANDLE_DEQUANTIZE_ALL`, which the reference toggles,
/// is process-wide and also read when a `QMatMul` is built, so concurrent tests would see each other's setting.
static QUANTIZED_ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn real_file() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL);
    if p.exists() {
        Some(p)
    } else {
        println!("SKIPPED: {REAL} is absent; run scripts/fetch_assets.sh to enable the real-model checks");
        None
    }
}

/// A byte-level BPE tokenizer: EOS, the 256 byte symbols and two merges.
fn tiny_tokenizer() -> Tokenizer {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 1).into());
    }
    vocab.insert("Ġt".into(), 257.into());
    vocab.insert("he".into(), 258.into());
    let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let j = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": bl, "post_processor": bl, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["Ġ t", "h e"]}
    });
    Tokenizer::from_inner(tokenizers::Tokenizer::from_bytes(j.to_string().as_bytes()).unwrap())
        .unwrap()
}

fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"vocab_size":259,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"rope_theta":100000.0,"rms_norm_eps":1e-5,
            "max_position_embeddings":64,"tie_word_embeddings":{tied},"eos_token_id":0}}"#
    ))
    .unwrap()
}

/// A tiny vanilla model with non-trivial norms (so swapped norm tensors would show).
fn tiny_model(tied: bool, seed: u64) -> MorModel {
    let m = MorModel::new(&tiny_config(tied), &Device::Cpu, seed).unwrap();
    let names: Vec<String> = m
        .params()
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| k.contains("norm"))
        .collect();
    for (i, n) in names.iter().enumerate() {
        let v = m.params().get(n).unwrap().as_tensor().clone();
        let w = ((v.ones_like().unwrap() * (1.0 + 0.1 * i as f64)).unwrap()
            + Tensor::randn(0f32, 0.2, v.dims(), &Device::Cpu).unwrap())
        .unwrap();
        m.params().set(n, &w).unwrap();
    }
    m
}

fn logits(m: &MorModel, ids: &[u32]) -> Tensor {
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(&x, &ForwardOptions::eval())
        .unwrap()
        .logits
        .i(0)
        .unwrap()
}

/// Last-position logits of candle-transformers' llama on a GGUF file, in a fresh thread so that
/// `CANDLE_DEQUANTIZE_ALL` (read once per thread) takes effect when `dequantize` is set.
fn reference_logits(path: &Path, ids: &[u32], dequantize: bool) -> Tensor {
    let path = path.to_path_buf();
    let ids = ids.to_vec();
    std::thread::spawn(move || {
        if dequantize {
            std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        } else {
            std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
        }
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut m = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        m.forward(&x, 0).unwrap().i(0).unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn export_import_round_trip_is_exact_and_matches_an_independent_llama() {
    let _env = QUANTIZED_ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    for tied in [true, false] {
        let model = tiny_model(tied, 5);
        let path = dir.path().join(format!("tiny-{tied}.gguf"));
        export_gguf(&model, Some(&tok), &path).unwrap();
        let (back, tok2) = import_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(back.config().hidden_size, 64);
        assert_eq!(back.config().num_key_value_heads, 2);
        assert_eq!(back.config().rope_theta, 100000.0);
        assert_eq!(back.config().tie_word_embeddings, tied);
        for (name, v) in model.params().iter() {
            let w = back.params().get(name).unwrap();
            assert_eq!(max_abs_diff(v.as_tensor(), w.as_tensor()), 0.0, "{name}");
        }
        let text = "the theory of the thing";
        assert_eq!(tok2.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(tok2.decode(&tok2.encode(text).unwrap()).unwrap(), text);
        assert_eq!(tok2.eos_id(), 0);

        // candle-transformers runs llama.cpp's interleaved RoPE on the permuted rows; mor runs HF's rotate-half
        // RoPE on the restored rows. Identical logits prove the permutation and its inverse.
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 259).collect();
        let ours = logits(&back, &ids).i(ids.len() - 1).unwrap();
        let theirs = reference_logits(&path, &ids, false);
        let diff = max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "max |Δlogit| = {diff}");

        // Sensitivity: without the inverse permutation the logits differ clearly.
        let mut f = GgufFile::open(&path).unwrap();
        let cfg = f.config().unwrap();
        let store = f.params(&cfg, &Device::Cpu).unwrap();
        let raw = mor::io::gguf::permute_qk(
            store
                .get("model.layers.1.self_attn.q_proj.weight")
                .unwrap()
                .as_tensor(),
            4,
        )
        .unwrap();
        store
            .set("model.layers.1.self_attn.q_proj.weight", &raw)
            .unwrap();
        let broken = MorModel::from_params(&cfg, store).unwrap();
        let bad = max_abs_diff(&logits(&broken, &ids).i(ids.len() - 1).unwrap(), &theirs);
        assert!(
            bad > 100.0 * diff.max(1e-6),
            "permutation undetected: {bad} vs {diff}"
        );
    }
}

#[test]
fn export_refuses_recursive_models() {
    let mut cfg = tiny_config(true);
    cfg.num_hidden_layers = 5;
    cfg.recursion = Some(mor::config::RecursionConfig {
        sharing: mor::config::Sharing::MiddleCycle,
        num_recursion: 3,
        initialization: mor::config::Initialization::Random,
    });
    let m = MorModel::new(&cfg, &Device::Cpu, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = export_gguf(&m, None, &dir.path().join("x.gguf")).unwrap_err();
    assert!(e.to_string().contains("vanilla models only"), "{e}");
}

/// Write a GGUF with the tiny model's tensors, letting `edit` drop or change entries first.
fn write_edited(
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let src = path.with_extension("src.gguf");
    export_gguf(&tiny_model(true, 1), Some(&tiny_tokenizer()), &src).unwrap();
    let mut f = std::fs::File::open(&src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = ct.metadata.clone().into_iter().collect();
    let mut tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|k| (k.clone(), ct.tensor(&mut f, k, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut meta, &mut tensors);
    let mut out = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

/// Float tensors stream from the file into the requested dtype: F32, F16 and BF16 files loaded as f32 or bf16
/// hold exactly the exported model's weights rounded to the stored type, then to the requested one.
#[test]
fn float_files_load_into_f32_and_bf16_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // The F32 file (its exact round trip is `export_import_round_trip_is_exact_and_matches_an_independent_llama`)
    // and the same tensors rewritten as F16 and BF16.
    let f32_path = dir.path().join("F32.gguf");
    write_edited(&f32_path, |_, _| {});
    let reference = GgufFile::open(&f32_path)
        .unwrap()
        .model(&Device::Cpu)
        .unwrap();
    for stored in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        let p = dir.path().join(format!("{stored:?}.gguf"));
        if stored != GgmlDType::F32 {
            let mut f = std::fs::File::open(&f32_path).unwrap();
            let ct = gguf_file::Content::read(&mut f).unwrap();
            let tensors: Vec<(String, QTensor)> = ct
                .tensor_infos
                .keys()
                .map(|k| {
                    let t = ct.tensor(&mut f, k, &Device::Cpu).unwrap();
                    let t = t.dequantize(&Device::Cpu).unwrap();
                    (k.clone(), QTensor::quantize(&t, stored).unwrap())
                })
                .collect();
            let meta: Vec<(&str, &Value)> =
                ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &meta, &t).unwrap();
        }
        // Rounding to the stored type commutes with the q/k row permutation.
        let stored_dtype = match stored {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        for dtype in [DType::F32, DType::BF16] {
            let m = GgufFile::open(&p)
                .unwrap()
                .model_as(&Device::Cpu, dtype)
                .unwrap();
            assert_eq!(m.params().dtype(), dtype);
            for (name, v) in reference.params().iter() {
                let want = v.as_tensor().to_dtype(stored_dtype).unwrap();
                let want = want.to_dtype(DType::F32).unwrap().to_dtype(dtype).unwrap();
                let got = m.params().get(name).unwrap().as_tensor();
                assert_eq!(got.dtype(), dtype, "{name}");
                let values = |t: &Tensor| -> Vec<f32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                let (a, b) = (values(&want), values(got));
                assert_eq!(a, b, "{stored:?} as {dtype:?}: {name}");
            }
        }
    }
    // A truncated float tensor is an error, not a short read.
    let p = dir.path().join("F32.gguf");
    let len = std::fs::metadata(&p).unwrap().len();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..(len - 4) as usize]).unwrap();
    assert!(GgufFile::open(&p).is_err());
}

fn import_err(path: &Path) -> String {
    import_gguf(path, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn bad_files_fail_with_the_tensor_or_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");

    write_edited(&p, |_, t| t.retain(|(k, _)| k != "blk.1.ffn_up.weight"));
    let e = import_err(&p);
    assert!(e.contains("missing tensor blk.1.ffn_up.weight"), "{e}");

    write_edited(&p, |_, t| {
        for (k, v) in t.iter_mut() {
            if k == "blk.2.attn_k.weight" {
                let z = Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap();
                *v = QTensor::quantize(&z, GgmlDType::F32).unwrap();
            }
        }
    });
    let e = import_err(&p);
    assert!(
        e.contains("tensor blk.2.attn_k.weight: expected shape [32, 64], found [16, 64]"),
        "{e}"
    );

    write_edited(&p, |m, _| {
        m.retain(|(k, _)| k != "llama.feed_forward_length")
    });
    let e = import_err(&p);
    assert!(
        e.contains("missing metadata field llama.feed_forward_length"),
        "{e}"
    );

    write_edited(&p, |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("gpt2".into());
            }
        }
    });
    assert!(import_err(&p).contains("general.architecture = \"gpt2\""));

    write_edited(&p, |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = Value::String("llama".into());
            }
        }
    });
    assert!(import_err(&p).contains("tokenizer.ggml.model = \"llama\""));

    // Q8_0 weights dequantize (block size 32 divides every row of the tiny model).
    write_edited(&p, |_, t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("ffn_gate.weight") {
                let w = v.dequantize(&Device::Cpu).unwrap();
                *v = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            }
        }
    });
    import_gguf(&p, &Device::Cpu).unwrap();

    // A truncated copy: the header parses, the tensor data is cut.
    let good = dir.path().join("good.gguf");
    export_gguf(&tiny_model(true, 2), Some(&tiny_tokenizer()), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = import_err(&p);
    assert!(
        e.contains("truncated file: tensor ") && e.contains("needs bytes up to"),
        "{e}"
    );
    // Cut inside the header.
    std::fs::write(&p, &bytes[..200]).unwrap();
    assert!(import_err(&p).contains("not a readable GGUF file"));
    std::fs::write(&p, b"not a gguf file at all").unwrap();
    assert!(import_err(&p).contains("not a readable GGUF file"));
    assert!(import_err(&dir.path().join("absent.gguf")).contains("absent.gguf"));
}

/// A public-domain passage in modern English (US Declaration of Independence, 1776).
const DECLARATION: &str = "When in the Course of human events, it becomes necessary for one people to dissolve the \
political bands which have connected them with another, and to assume among the powers of the earth, the separate \
and equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of \
mankind requires that they should declare the causes which impel them to the separation. We hold these truths to be \
self-evident, that all men are created equal, that they are endowed by their Creator with certain unalienable \
Rights, that among these are Life, Liberty and the pursuit of Happiness.";

/// Mean next-token NLL of `ids` under `m`.
fn mean_nll(m: &MorModel, ids: &[u32]) -> f64 {
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let out = m.forward(&x, &ForwardOptions::eval()).unwrap();
    let l = m.loss(&out, &x, ids.len() - 1).unwrap();
    l.lm.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn real_smollm2_matches_candle_transformers_and_reads_english() {
    let _env = QUANTIZED_ENV.lock().unwrap_or_else(|e| e.into_inner());
    let Some(path) = real_file() else { return };
    let mut f = GgufFile::open(&path).unwrap();
    let cfg = f.config().unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size
        ),
        (30, 576, 1536)
    );
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (9, 3));
    assert_eq!((cfg.vocab_size, cfg.rope_theta), (49152, 100000.0));
    assert!(cfg.tie_word_embeddings);
    let tok = f.tokenizer().unwrap();
    assert_eq!(tok.eos_id(), 0);
    let text = "In 1984, the year 2048 was far away.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // SmolLM's pre-tokenizer splits numbers into single digits.
    for d in ["1", "9", "8", "4"] {
        assert!(ids.contains(&tok.token_to_id(d).unwrap()));
    }
    let model = f.model(&Device::Cpu).unwrap();

    let prompt = "The capital of France is";
    let ids = tok.encode(prompt).unwrap();
    let ours = logits(&model, &ids).i(ids.len() - 1).unwrap();
    let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    for (dequantize, tol) in [(true, 2e-3f32), (false, f32::INFINITY)] {
        let theirs = reference_logits(&path, &ids, dequantize);
        let diff = max_abs_diff(&ours, &theirs);
        let scale = theirs
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!(
            "vs candle-transformers quantized_llama ({}): max |Δlogit| = {diff:.2e} (max |logit| {scale:.1}); top-1 {} / {}",
            if dequantize { "dequantized f32 matmuls" } else { "quantized Q4_1×Q8_1 matmuls" },
            top(&ours),
            top(&theirs)
        );
        assert!(diff < tol, "max |Δlogit| = {diff}");
        assert_eq!(top(&ours), top(&theirs));
    }

    let passage = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sonnets.txt"),
    )
    .unwrap();
    let ids: Vec<u32> = tok
        .encode(&passage)
        .unwrap()
        .into_iter()
        .take(256)
        .collect();
    let nll = mean_nll(&model, &ids);
    println!(
        "perplexity on the first {} tokens of tests/data/sonnets.txt: {:.2} (NLL {nll:.4})",
        ids.len(),
        nll.exp()
    );
    // Early-modern verse is hard for a 135M model; the bound only catches a broken import (ppl in the thousands).
    assert!(nll.exp() < 100.0, "perplexity {}", nll.exp());
    let ids = tok.encode(DECLARATION).unwrap();
    let nll = mean_nll(&model, &ids);
    println!(
        "perplexity on the opening of the US Declaration of Independence ({} tokens): {:.2} (NLL {nll:.4})",
        ids.len(),
        nll.exp()
    );
    assert!(nll.exp() < 20.0, "perplexity {}", nll.exp());

    let params = mor::engine::sampling::SamplingParams {
        temperature: 0.0,
        max_new_tokens: 48,
        ..Default::default()
    };
    let g = mor::engine::generate::generate(
        &model,
        &tok,
        "The capital of France is",
        &params,
        &mut |_| {},
    )
    .unwrap();
    println!("greedy: The capital of France is{}", g.text);
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    // Generation ends at the model's own end token (<|im_end|>, id 2 in this file), not only at id 0.
    assert_eq!(g.finish, mor::engine::Finish::Eos, "{:?}", g.text);
    assert!(!g.text.contains("<|im_end|>"), "{:?}", g.text);
}

#[test]
fn real_smollm2_quantized_weights_are_the_stored_blocks_in_hf_row_order() {
    let Some(path) = real_file() else { return };
    let mut f = GgufFile::open(&path).unwrap();
    let cfg = f.config().unwrap();
    let q = f.quantized_weights(&cfg).unwrap();
    assert_eq!(q.layers.len(), 30);
    let dense = f.params(&cfg, &Device::Cpu).unwrap();
    let get = |n: &str| dense.get(n).unwrap().as_tensor().clone();
    let deq = |m: &mor::engine::quant::QMatrix| {
        let mut v = vec![0f32; m.rows() * m.cols()];
        for (r, row) in v.chunks_exact_mut(m.cols()).enumerate() {
            m.dequantize_row(r, row);
        }
        Tensor::from_vec(v, (m.rows(), m.cols()), &Device::Cpu).unwrap()
    };
    for l in [0, 17, 29] {
        let p = |n: &str| get(&format!("model.layers.{l}.{n}.weight"));
        let layer = &q.layers[l];
        let qkv = Tensor::cat(
            &[
                p("self_attn.q_proj"),
                p("self_attn.k_proj"),
                p("self_attn.v_proj"),
            ],
            0,
        )
        .unwrap();
        // Moving whole quantized rows is exact: dequantizing afterwards gives the dense import bit for bit.
        assert_eq!(max_abs_diff(&deq(&layer.qkv), &qkv), 0.0, "layer {l} qkv");
        assert_eq!(max_abs_diff(&deq(&layer.q), &p("self_attn.q_proj")), 0.0);
        assert_eq!(max_abs_diff(&deq(&layer.o), &p("self_attn.o_proj")), 0.0);
        let gu = Tensor::cat(&[p("mlp.gate_proj"), p("mlp.up_proj")], 0).unwrap();
        assert_eq!(max_abs_diff(&deq(&layer.gate_up), &gu), 0.0);
        assert_eq!(max_abs_diff(&deq(&layer.down), &p("mlp.down_proj")), 0.0);
        assert_eq!(layer.qkv.format(), mor::engine::quant::QFormat::Q4_1);
    }
    assert_eq!(
        max_abs_diff(&deq(&q.head), &get("model.embed_tokens.weight")),
        0.0
    );
}

#[test]
fn real_smollm2_runs_quantized_like_an_independent_quantized_llama() {
    let _env = QUANTIZED_ENV.lock().unwrap_or_else(|e| e.into_inner());
    let Some(path) = real_file() else { return };
    let mut f = GgufFile::open(&path).unwrap();
    let tok = f.tokenizer().unwrap();
    let model = f.model(&Device::Cpu).unwrap().frozen().unwrap();
    let cfg = model.config().clone();

    // End to end against candle-transformers' quantized llama on the same file. Quantizing activations to 8 bits
    // makes logits sensitive at the ~1 level to any f32 difference upstream (scaling one RMSNorm weight by
    // 1 + 1e-6 moved them by 1.09 when measured), so the check is the prediction and that the logits are those of
    // a quantized model (about 0.7 from the dense ones), not bit equality.
    let cached =
        mor::engine::CachedModel::quantized(&model, f.quantized_weights(&cfg).unwrap()).unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let mut cache = cached.new_cache();
    let opts = mor::engine::StepOptions::default();
    let ours = cached
        .step(&mut [&mut cache], &[&ids], &opts)
        .unwrap()
        .logits
        .i(0)
        .unwrap();
    let theirs = reference_logits(&path, &ids, false);
    let dense = reference_logits(&path, &ids, true);
    let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let (d_quant, d_dense) = (max_abs_diff(&ours, &theirs), max_abs_diff(&ours, &dense));
    println!("quantized engine: max |Δlogit| {d_quant:.2} vs the quantized reference, {d_dense:.2} vs dense");
    assert_eq!(top(&ours), top(&theirs));
    assert!(d_quant < 2.0 && d_dense > 0.1, "{d_quant} {d_dense}");
    // A cached decode step continues from the prefill exactly as a longer prefill would.
    let next = top(&ours);
    let step = cached.step(&mut [&mut cache], &[&[next]], &opts).unwrap();
    let mut ctx = ids.clone();
    ctx.push(next);
    let full = cached
        .step(&mut [&mut cached.new_cache()], &[&ctx], &opts)
        .unwrap();
    assert_eq!(
        max_abs_diff(&step.logits.i(0).unwrap(), &full.logits.i(0).unwrap()),
        0.0
    );

    // The wrong model is refused.
    let mut other = f.quantized_weights(&cfg).unwrap();
    other.layers.pop();
    let e = mor::engine::CachedModel::quantized(&model, other)
        .err()
        .unwrap();
    assert!(e.to_string().contains("29 quantized layers"), "{e}");
}
