//! Up-training experiment: SmolLM2-135M (GGUF) → MoR (Middle-Cycle, N_r = 3, expert-choice) vs the same MoR from
//! scratch and the original vanilla model, by held-out loss on a prepared corpus.
//!
//! `cargo run --example uptrain_compare -- GGUF DATA_DIR OUT_DIR STEPS SEQ_LEN BATCH`

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use mor::config::{Initialization, MorConfig, Sharing};
use mor::model::expert_choice::RouteMode;
use mor::model::MorModel;
use mor::train::trainer::{TrainConfig, Trainer};
use mor::train::{AdamWConfig, LrSchedule};

fn train_cfg(steps: usize, seq_len: usize, batch: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        seq_len,
        batch_size: batch,
        grad_accum: 1,
        steps,
        lr,
        schedule: LrSchedule::Wsd {
            warmup: Some(steps / 10),
            total: steps,
            decay_fraction: 0.2,
        },
        optimizer: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 0,
        shuffle: true,
        eval_every: 0,
        eval_sequences: 16,
        save_every: 0,
        keep_last: 1,
        log_every: 5,
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 7,
        "usage: GGUF DATA_DIR OUT_DIR STEPS SEQ_LEN BATCH"
    );
    let (gguf, data, out) = (
        PathBuf::from(&a[1]),
        PathBuf::from(&a[2]),
        PathBuf::from(&a[3]),
    );
    let (steps, seq, batch): (usize, usize, usize) = (a[4].parse()?, a[5].parse()?, a[6].parse()?);
    let top_k = RouteMode::TopK { step: None };
    let (src, _) = mor::io::gguf::import_gguf(&gguf, &Device::Cpu)?;
    let eval = |name: &str, m: MorModel| -> anyhow::Result<()> {
        let t = Trainer::new(m, train_cfg(1, seq, batch, 1e-4), &data, &out.join(name))?;
        println!(
            "{name}: held-out loss {:.4}",
            t.evaluate(top_k)?.unwrap_or(f64::NAN)
        );
        Ok(())
    };
    eval("vanilla", src.clone())?;
    for init in [Initialization::Stepwise, Initialization::Average] {
        let rec =
            mor::train::uptrain::uptrain_config(src.config(), Sharing::MiddleCycle, 3, init, None)?;
        eval(
            &format!("recursive-{init:?}-step0"),
            mor::train::uptrain::uptrain_model(&src, &rec, 0)?,
        )?;
    }
    let target = mor::train::uptrain::uptrain_config(
        src.config(),
        Sharing::MiddleCycle,
        3,
        Initialization::Stepwise,
        Some(MorConfig::expert()),
    )?;
    for (name, model, lr) in [
        (
            "mor-uptrained",
            mor::train::uptrain::uptrain_model(&src, &target, 0)?,
            3e-4,
        ),
        (
            "mor-scratch",
            MorModel::new(&target, &Device::Cpu, 0)?,
            3e-3,
        ),
    ] {
        let mut t = Trainer::new(
            model,
            train_cfg(steps, seq, batch, lr),
            &data,
            &out.join(name),
        )?;
        let before = t.evaluate(top_k)?.unwrap_or(f64::NAN);
        let start = Instant::now();
        let s = t.run(false)?;
        println!(
            "{name} (lr {lr:e}): held-out loss {before:.4} at step 0 -> {:.4} after {steps} steps ({:.0} s)",
            s.val_loss.unwrap_or(f64::NAN),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
