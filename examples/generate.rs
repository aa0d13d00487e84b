//! The smallest complete use of the library: load a model (a checkpoint directory, a run directory or a `.gguf`
//! file) and generate greedily from a prompt with the KV-cached engine.
//!
//! `cargo run --release --example generate -- MODEL "PROMPT"`, for example after `mor quickstart`:
//! `cargo run --release --example generate -- runs/quickstart/run "To be, or not to be"`.

use std::io::Write;
use std::path::PathBuf;

use mor::engine::generate::generate;
use mor::engine::sampling::SamplingParams;
use mor::io::load::{load, LoadOptions};

fn main() -> mor::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), prompt) = (args.next(), args.next().unwrap_or_default()) else {
        eprintln!("usage: generate MODEL [PROMPT]");
        std::process::exit(2);
    };
    let loaded = load(&PathBuf::from(model), &LoadOptions::default())?;
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 40,
        ..SamplingParams::default()
    };
    print!("{prompt}");
    let out = generate(
        &loaded.model,
        loaded.tokenizer()?,
        &prompt,
        &params,
        &mut |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        },
    )?;
    println!(
        "\n[{} new tokens, finished by {:?}]",
        out.tokens.len(),
        out.finish
    );
    Ok(())
}
