//! `mor chat`: a terminal chat on the generation engine, streaming the reply as it is generated.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use clap::Args;

use mor::engine::{CachedModel, Engine, EngineOptions, Finish};
use mor::serve::api::Message;

use super::generate::SamplingArgs;
use super::serve::{load_served, ModelArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Read user turns from stdin (one per line; `/reset` forgets the conversation, `/exit` or end of input quits) and
/// stream each reply to stdout.
pub fn run_chat(a: &ChatArgs) -> Result<()> {
    let served = load_served(&a.model)?;
    let template = served
        .chat_template
        .as_ref()
        .context("this model has no chat template (none in its GGUF metadata or a tokenizer_config.json beside it); use `mor generate`")?;
    let cached = match served.quantized {
        Some(w) => CachedModel::quantized(&served.model, w)?,
        None => CachedModel::new(&served.model)?,
    };
    let opts = EngineOptions {
        max_batch: 1,
        ..Default::default()
    };
    let mut engine = Engine::with_cached(cached, Some(&served.tokenizer), opts)?;
    let params = a.sampling.params();
    let opening: Vec<Message> = a
        .system
        .iter()
        .map(|t| Message {
            role: "system".into(),
            content: t.clone(),
        })
        .collect();
    let mut messages = opening.clone();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("mor chat: type a message and press Enter; /reset starts over, /exit quits.");
    for (turn, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = opening.clone();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        messages.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let prompt = served.tokenizer.encode(&template.render(&messages)?)?;
        let mut p = params.clone();
        // A different seed per turn, reproducible from --seed.
        p.seed = params.seed.wrapping_add(turn as u64);
        if let Err(e) = engine.submit(prompt, p) {
            messages.pop();
            eprintln!("error: {e} (try /reset)");
            continue;
        }
        let finished = loop {
            engine.step()?;
            for piece in engine.take_progress() {
                print!("{}", piece.text);
                out.flush()?;
            }
            if let Some(f) = engine.take_finished().pop() {
                break f;
            }
        };
        println!();
        match finished.finish {
            Finish::Failed(msg) => bail!("generation failed: {msg}"),
            finish => {
                if finish == Finish::Length {
                    eprintln!("(reply cut at --max-tokens {})", params.max_new_tokens);
                }
                messages.push(Message {
                    role: "assistant".into(),
                    content: finished.text.unwrap_or_default(),
                });
            }
        }
    }
    Ok(())
}
