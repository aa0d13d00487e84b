//! Integration tests of the data pipeline: tokenizer, corpus preparation, packing,
//! sampling and evaluation windows, on the small Shakespeare samples in `tests/data/`.

use mor::data::{
    prepare_corpus, BatchSampler, CorpusInfo, DocumentSplit, PackedDataset, PrepareOptions,
    TokenFile, Tokenizer,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// One tokenizer for all tests: training is the slow part.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::train_bpe(&[sample("sonnets.txt"), sample("sonnets.jsonl")], 600)
            .expect("training on the samples")
    })
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn gzip(dir: &Path, name: &str, content: &str) -> PathBuf {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(content.as_bytes()).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, enc.finish().unwrap()).unwrap();
    path
}

#[test]
fn trained_tokenizer_round_trips_and_has_eos_zero() {
    let tok = tokenizer();
    assert_eq!(tok.eos_id(), 0);
    assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert!(tok.vocab_size() > 300 && tok.vocab_size() <= 600);

    let text = std::fs::read_to_string(sample("sonnets.txt")).unwrap();
    let ids = tok.encode(&text).unwrap();
    assert!(!ids.contains(&0), "no special tokens are added by encode");
    assert!(
        ids.len() < text.len() / 2,
        "BPE merges should compress the text"
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);

    // Unseen text, unicode and odd whitespace still round-trip (byte-level alphabet).
    let odd = "  Zoë's naïve café —\ttabs\r\nand 日本語 \n\n";
    assert_eq!(tok.decode(&tok.encode(odd).unwrap()).unwrap(), odd);
    assert!(tok.decode(&[u32::MAX]).is_err());
}

#[test]
fn tokenizer_save_load_keeps_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let tok = tokenizer();
    tok.save(&path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    assert_eq!(loaded.eos_id(), 0);
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.fingerprint().unwrap(), tok.fingerprint().unwrap());
    let text = "Shall I compare thee to a summer's day?";
    assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
    // No temp file is left behind by the atomic write.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn bad_tokenizer_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let err = Tokenizer::from_file(&missing).unwrap_err().to_string();
    assert!(err.contains("nope.json"), "{err}");

    let garbage = write(dir.path(), "garbage.json", "{ this is not a tokenizer");
    let err = Tokenizer::from_file(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.json") && err.contains("not a valid tokenizer.json"),
        "{err}"
    );

    // A valid tokenizer without any EOS spelling is rejected by name.
    let json = tokenizer()
        .to_json()
        .unwrap()
        .replace("<|endoftext|>", "<|something|>");
    let no_eos = write(dir.path(), "no_eos.json", &json);
    let err = Tokenizer::from_file(&no_eos).unwrap_err().to_string();
    assert!(
        err.contains("no_eos.json") && err.contains("no EOS token"),
        "{err}"
    );
}

#[test]
fn prepare_places_eos_after_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let docs = ["First document.", "Second one,\nwith two lines.", "Third!"];
    let jsonl: String = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    let input = write(dir.path(), "docs.jsonl", &jsonl);
    let out = dir.path().join("out");
    let opts = PrepareOptions {
        val_fraction: 0.0,
        ..Default::default()
    };
    let info = prepare_corpus(&[input], tok, &out, &opts).unwrap();

    let expected: Vec<u32> = docs
        .iter()
        .flat_map(|d| {
            let mut ids = tok.encode(d).unwrap();
            ids.push(0);
            ids
        })
        .collect();
    let train = TokenFile::open(CorpusInfo::train_path(&out)).unwrap();
    assert_eq!(train.get(0..train.len()).unwrap(), expected);
    assert_eq!(train.get(0..1).unwrap()[0], tok.encode("First").unwrap()[0]);
    assert_eq!(info.train_tokens, expected.len() as u64);
    assert_eq!(info.train_documents, 3);
    assert_eq!(info.val_tokens, 0);
    assert_eq!(
        TokenFile::open(CorpusInfo::val_path(&out)).unwrap().len(),
        0
    );
    assert_eq!(
        tok.decode(&expected).unwrap(),
        docs.join("<|endoftext|>") + "<|endoftext|>"
    );

    // corpus.json round-trips and detects a different tokenizer.
    let loaded = CorpusInfo::load(&out).unwrap();
    assert_eq!(loaded, info);
    loaded.check_tokenizer(tok).unwrap();
    let other = Tokenizer::train_bpe(&[sample("sonnets.txt")], 400).unwrap();
    let err = loaded.check_tokenizer(&other).unwrap_err().to_string();
    assert!(err.contains("tokenizer mismatch"), "{err}");
    // Only the three outputs remain: no temporary files.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["corpus.json", "train.tokens", "val.tokens"]);
}

#[test]
fn held_out_split_takes_whole_documents() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    // 20 distinguishable documents, split across a text file (blank-line mode) and a
    // gzipped JSONL file; 0.2 of 20 = 4 validation documents: 5th, 10th, 15th, 20th.
    let docs: Vec<String> = (0..20)
        .map(|i| format!("document number {i} here"))
        .collect();
    let txt = write(dir.path(), "a.txt", &(docs[..10].join("\n\n\n") + "\n"));
    let jsonl: String = docs[10..]
        .iter()
        .map(|d| serde_json::json!({ "body": d }).to_string() + "\n")
        .collect();
    let gz = gzip(dir.path(), "b.jsonl.gz", &jsonl);
    let opts = PrepareOptions {
        val_fraction: 0.2,
        split: DocumentSplit::BlankLines,
        jsonl_field: "body".into(),
        show_progress: false,
    };
    let out = dir.path().join("out");
    let info = prepare_corpus(&[txt, gz], tok, &out, &opts).unwrap();
    assert_eq!((info.train_documents, info.val_documents), (16, 4));
    assert!(!info.split_within_document);
    assert_eq!(info.sources.len(), 2);
    assert_eq!(info.sources[0].documents, 10);
    assert_eq!(info.sources[1].documents, 10);

    let decode_docs = |path: PathBuf| -> Vec<String> {
        let f = TokenFile::open(path).unwrap();
        let text = tok.decode(&f.get(0..f.len()).unwrap()).unwrap();
        let mut parts: Vec<String> = text.split("<|endoftext|>").map(String::from).collect();
        assert_eq!(parts.pop().as_deref(), Some(""), "stream ends with EOS");
        parts
    };
    let val = decode_docs(CorpusInfo::val_path(&out));
    let train = decode_docs(CorpusInfo::train_path(&out));
    let want_val: Vec<String> = [4, 9, 14, 19].iter().map(|&i| docs[i].clone()).collect();
    assert_eq!(val, want_val);
    let want_train: Vec<String> = (0..20)
        .filter(|i| i % 5 != 4)
        .map(|i| docs[i].clone())
        .collect();
    assert_eq!(train, want_train);
    assert_eq!(
        info.train_tokens + info.val_tokens,
        info.sources.iter().map(|s| s.tokens).sum::<u64>()
    );
}

#[test]
fn single_document_holds_out_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let input = sample("sonnets.txt");
    let opts = PrepareOptions {
        val_fraction: 0.1,
        ..Default::default()
    };
    let out = dir.path().join("out");
    let info = prepare_corpus(std::slice::from_ref(&input), tok, &out, &opts).unwrap();
    assert!(info.split_within_document);
    let total = info.train_tokens + info.val_tokens;
    assert_eq!(info.val_tokens, (total as f64 * 0.1).round() as u64);

    let mut all = tok
        .encode(&std::fs::read_to_string(&input).unwrap())
        .unwrap();
    all.push(0);
    let train = TokenFile::open(CorpusInfo::train_path(&out)).unwrap();
    let val = TokenFile::open(CorpusInfo::val_path(&out)).unwrap();
    let mut joined = train.get(0..train.len()).unwrap();
    joined.extend(val.get(0..val.len()).unwrap());
    assert_eq!(joined, all);
    assert_eq!(val.len() as u64, info.val_tokens);
}

#[test]
fn prepare_reports_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let out = dir.path().join("out");
    let opts = PrepareOptions::default();

    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": oops}\n",
    );
    let err = prepare_corpus(&[bad], tok, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:3:") && err.contains("not valid JSON"),
        "{err}"
    );

    let missing_field = write(
        dir.path(),
        "nofield.jsonl",
        "{\"text\":\"a\"}\n{\"txt\":\"b\"}\n",
    );
    let err = prepare_corpus(&[missing_field], tok, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nofield.jsonl:2:") && err.contains("no \"text\" field"),
        "{err}"
    );

    let empty = write(dir.path(), "empty.txt", " \n\n\t\n");
    let err = prepare_corpus(&[empty], tok, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty corpus"), "{err}");

    let missing = dir.path().join("missing.txt");
    let err = prepare_corpus(&[missing], tok, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.txt"), "{err}");

    let good = write(dir.path(), "good.txt", "hello");
    let bad_frac = PrepareOptions {
        val_fraction: 1.0,
        ..Default::default()
    };
    assert!(prepare_corpus(&[good], tok, &out, &bad_frac).is_err());
    // Failed runs leave no outputs or temporary files behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn token_file(dir: &Path, tokens: &[u32]) -> TokenFile {
    let path = dir.join("t.tokens");
    TokenFile::write(&path, tokens).unwrap();
    TokenFile::open(&path).unwrap()
}

#[test]
fn truncated_token_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trunc.tokens");
    std::fs::write(&path, [1u8, 0, 0, 0, 2, 0]).unwrap();
    let err = TokenFile::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("trunc.tokens") && err.contains("not a multiple of 4"),
        "{err}"
    );
}

#[test]
fn token_file_reads_little_endian_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..1000).map(|i| i * 65_537 + 3).collect();
    let f = token_file(dir.path(), &tokens);
    assert_eq!(f.len(), 1000);
    assert_eq!(f.get(10..13).unwrap(), &tokens[10..13]);
    let raw = std::fs::read(f.path()).unwrap();
    assert_eq!(&raw[4..8], &tokens[1].to_le_bytes());
    assert_eq!(f.max_token(), tokens.iter().copied().max());
    let err = f.get(990..1001).unwrap_err().to_string();
    assert!(err.contains("out of bounds"), "{err}");
}

#[test]
fn packing_drops_the_tail_and_needs_one_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let f = token_file(dir.path(), &(0..10).collect::<Vec<_>>());
    let ds = PackedDataset::new(f.clone(), 3).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.sequence(0).unwrap(), [0, 1, 2]);
    assert_eq!(ds.sequence(2).unwrap(), [6, 7, 8]);
    assert!(ds.sequence(3).is_err());
    let err = PackedDataset::new(f, 11).unwrap_err().to_string();
    assert!(
        err.contains("holds 10 tokens") && err.contains("seq_len = 11"),
        "{err}"
    );
}

#[test]
fn sequential_sampler_walks_in_order_and_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let ds = PackedDataset::new(token_file(dir.path(), &(0..10).collect::<Vec<_>>()), 2).unwrap();
    let mut s = BatchSampler::new(0, false);
    assert_eq!(s.next_batch(&ds, 2).unwrap(), [0, 1, 2, 3]);
    assert_eq!(s.next_batch(&ds, 2).unwrap(), [4, 5, 6, 7]);
    // 5 sequences: this batch takes the last one and wraps to epoch 1.
    assert_eq!(s.next_batch(&ds, 2).unwrap(), [8, 9, 0, 1]);
    assert_eq!((s.epoch, s.cursor), (1, 1));
    // Batches larger than the dataset span several epochs.
    assert_eq!(s.next_indices(&ds, 12).unwrap().len(), 12);
    assert_eq!((s.epoch, s.cursor), (3, 3));
    assert!(s.next_batch(&ds, 0).is_err());
}

#[test]
fn shuffled_sampler_is_deterministic_and_covers_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ds = PackedDataset::new(token_file(dir.path(), &(0..400).collect::<Vec<_>>()), 4).unwrap();
    let draw = |seed| {
        let mut s = BatchSampler::new(seed, true);
        (0..25)
            .map(|_| s.next_indices(&ds, 8).unwrap())
            .collect::<Vec<_>>()
    };
    let a = draw(42);
    assert_eq!(a, draw(42));
    assert_ne!(a, draw(43));
    let flat: Vec<usize> = a.concat();
    // Each epoch (100 sequences) is a permutation, and epochs differ in order.
    for epoch in flat.chunks(100) {
        let mut sorted = epoch.to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
    assert_ne!(flat[..100], flat[100..]);
    assert_ne!(flat[..100], (0..100).collect::<Vec<_>>());
    // Batch contents are the sequences the indices name.
    let mut s = BatchSampler::new(42, true);
    let batch = s.next_batch(&ds, 8).unwrap();
    let want: Vec<u32> = a[0].iter().flat_map(|&i| ds.sequence(i).unwrap()).collect();
    assert_eq!(batch, want);
}

#[test]
fn sampler_resumes_from_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let ds = PackedDataset::new(token_file(dir.path(), &(0..280).collect::<Vec<_>>()), 4).unwrap();
    for shuffle in [false, true] {
        let mut uninterrupted = BatchSampler::new(7, shuffle);
        let reference: Vec<Vec<u32>> = (0..30)
            .map(|_| uninterrupted.next_batch(&ds, 6).unwrap())
            .collect();

        let mut s = BatchSampler::new(7, shuffle);
        let mut got: Vec<Vec<u32>> = (0..13).map(|_| s.next_batch(&ds, 6).unwrap()).collect();
        let saved = serde_json::to_string(&s).unwrap();
        drop(s);
        let mut restored: BatchSampler = serde_json::from_str(&saved).unwrap();
        got.extend((13..30).map(|_| restored.next_batch(&ds, 6).unwrap()));
        assert_eq!(got, reference, "shuffle = {shuffle}");
        assert_eq!(restored, uninterrupted);
    }

    // A state from a bigger dataset is refused rather than silently misread.
    let mut s: BatchSampler =
        serde_json::from_str(r#"{"seed":1,"epoch":0,"cursor":500,"shuffle":false}"#).unwrap();
    let err = s.next_batch(&ds, 1).unwrap_err().to_string();
    assert!(err.contains("cursor 500"), "{err}");
}

#[test]
fn eval_windows_score_every_token_once() {
    let dir = tempfile::tempdir().unwrap();
    for n in [1usize, 2, 5, 16, 17, 100, 101] {
        let tokens: Vec<u32> = (0..n as u32).map(|i| i * 3).collect();
        let f = token_file(dir.path(), &tokens);
        for (window, stride) in [(8, 7), (8, 1), (8, 3), (2, 1), (16, 15)] {
            let mut scored = vec![0u32; n];
            let mut count = 0;
            for w in mor::data::EvalWindows::new(&f, window, stride).unwrap() {
                count += 1;
                assert!(w.first_scored >= 1);
                assert!(w.tokens.len() == window || w.tokens.len() == n);
                assert_eq!(w.tokens, &tokens[w.start..w.start + w.tokens.len()]);
                if w.start > 0 {
                    // Later windows give every scored token at least window - stride context.
                    assert!(w.first_scored >= window - stride);
                }
                for j in w.first_scored..w.tokens.len() {
                    scored[w.start + j] += 1;
                }
            }
            assert_eq!(
                scored.first().copied().unwrap_or(0),
                0,
                "token 0 has no context"
            );
            assert!(
                scored.iter().skip(1).all(|&c| c == 1),
                "n={n} window={window} stride={stride}: {scored:?}"
            );
            if stride == window - 1 && n > 1 {
                // Non-overlapping: ceil((n - 1) / (window - 1)) windows.
                assert_eq!(count, (n - 1).div_ceil(window - 1));
            }
        }
    }
}

#[test]
fn eval_windows_from_dataset_cover_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let f = token_file(dir.path(), &(0..23).collect::<Vec<_>>());
    let ds = PackedDataset::new(f, 8).unwrap();
    assert_eq!(ds.len(), 2, "packing drops the 7-token tail");
    let windows: Vec<_> = ds.eval_windows(7).unwrap().collect();
    let last = windows.last().unwrap();
    assert_eq!(
        last.start + last.tokens.len(),
        23,
        "evaluation reaches the end"
    );
    assert!(ds.eval_windows(8).is_err());
}

#[test]
fn bundled_corpus_is_readable() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare.jsonl.gz");
    let docs: Vec<String> = mor::data::read_documents(&path, DocumentSplit::WholeFile, "text")
        .unwrap()
        .collect::<mor::Result<_>>()
        .unwrap();
    assert_eq!(docs.len(), 42);
    assert!(docs
        .iter()
        .any(|d| d.starts_with("HAMLET, PRINCE OF DENMARK")));
    let bytes: usize = docs.iter().map(String::len).sum();
    assert!((4_000_000..6_000_000).contains(&bytes), "{bytes}");
    assert!(!docs.iter().any(|d| d.contains("Project Gutenberg")));
}

/// End-to-end on the whole bundled corpus (tens of seconds): `cargo test --test data -- --ignored`.
#[test]
#[ignore]
fn bundled_corpus_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare.jsonl.gz");
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&corpus), 4096).unwrap();
    let trained = t0.elapsed();
    assert_eq!(tok.vocab_size(), 4096);
    let opts = PrepareOptions {
        val_fraction: 0.05,
        ..Default::default()
    };
    let info = prepare_corpus(&[corpus], &tok, dir.path(), &opts).unwrap();
    eprintln!(
        "train {trained:?}, prepare {:?}: {} train / {} val tokens, {} / {} docs",
        t0.elapsed() - trained,
        info.train_tokens,
        info.val_tokens,
        info.train_documents,
        info.val_documents
    );
    assert_eq!((info.train_documents, info.val_documents), (40, 2));
    let train = TokenFile::open(CorpusInfo::train_path(dir.path())).unwrap();
    assert_eq!(train.len() as u64, info.train_tokens);
    assert!(train.max_token().unwrap() < 4096);
    let ds = PackedDataset::new(train, 256).unwrap();
    let mut s = BatchSampler::new(0, true);
    assert_eq!(s.next_batch(&ds, 4).unwrap().len(), 4 * 256);
}
