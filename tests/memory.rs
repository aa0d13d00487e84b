//! The training-step memory estimate (`mor::train::memory`) against the allocator's measured peak of real steps at
//! a few small shapes, with and without fused ops and checkpointing. Its own test binary: the counting allocator's
//! peak is process-wide, so the shapes run one after another in one test.

use anyhow::Result;
use candle_core::{Device, Tensor};

use mor::bench::train::{variant_config, TrainBenchOptions};
use mor::model::{ForwardOptions, MorModel};
use mor::train::memory::{check_fits, estimate, StepShape};
use mor::train::{AdamW, AdamWConfig, NamedParam};

#[global_allocator]
static GLOBAL: mor::alloc::CountingAlloc = mor::alloc::CountingAlloc;

/// Measured peak heap bytes of the second training step (the first allocates AdamW's moments).
fn measured_peak(model: &MorModel, batch: usize, seq_len: usize) -> Result<usize> {
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), &Device::Cpu)?;
    let params: Vec<NamedParam> = model
        .params()
        .iter()
        .map(|(n, v)| NamedParam::new(n.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let mut peak = 0;
    for _ in 0..2 {
        mor::alloc::reset_peak();
        let out = model.forward_loss(&ids, &ForwardOptions::train(1000), batch * seq_len)?;
        let grads = out.backward()?;
        drop(out);
        opt.step(&grads, 1e-4)?;
        drop(grads);
        peak = mor::alloc::peak_bytes();
    }
    // The model's parameters were allocated before the measurement: the counter starts from the live bytes.
    Ok(peak)
}

#[test]
fn estimate_tracks_measured_peaks() -> Result<()> {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut worst = 0.0f64;
    for (variant, hidden, vocab, batch, seq_len) in [
        ("vanilla", 128, 4096, 4, 128),
        ("vanilla", 192, 2048, 2, 256),
        ("mor-expert-3", 128, 4096, 4, 128),
        ("recursive-3", 128, 2048, 2, 256),
    ] {
        let o = TrainBenchOptions {
            hidden_size: hidden,
            vocab,
            seq_len,
            ..Default::default()
        };
        let cfg = variant_config(variant, &o)?;
        for (fused, ckpt) in [(false, false), (true, false), (true, true)] {
            let mut model = MorModel::new(&cfg, &Device::Cpu, 0)?;
            model.set_fused_ops(fused);
            model.set_checkpointing(ckpt);
            let shape = StepShape {
                batch,
                seq_len,
                fused,
                checkpointing: ckpt,
            };
            let n_params = model.params().num_scalars();
            let est = estimate(&cfg, n_params, &shape)?;
            let got = measured_peak(&model, batch, seq_len)?;
            let ratio = est.total() as f64 / got as f64;
            println!(
                "{variant:<13} d={hidden} V={vocab} {batch}x{seq_len} fused={fused:<5} ckpt={ckpt:<5}: \
                 estimate {:>7.1} MiB, measured {:>7.1} MiB, ratio {ratio:.2}",
                mib(est.total()),
                mib(got)
            );
            worst = worst.max((ratio.ln()).abs());
            assert!(
                (0.75..=1.35).contains(&ratio),
                "{variant} {shape:?}: estimate {} vs measured {}",
                est.total(),
                got
            );
        }
    }
    println!(
        "worst estimate / measured ratio off by a factor {:.2}",
        worst.exp()
    );
    Ok(())
}

#[test]
fn a_run_that_cannot_fit_is_refused_with_the_flags_that_fit() -> Result<()> {
    let cfg = mor::config::presets::preset("smollm-135m-vanilla")?;
    let n_params = 134_515_008;
    let shape = StepShape {
        batch: 8,
        seq_len: 2048,
        fused: true,
        checkpointing: false,
    };
    let need = estimate(&cfg, n_params, &shape)?.total();
    let err = check_fits(&cfg, n_params, &shape, 1, need / 3)
        .expect_err("a third of the estimate must not fit")
        .to_string();
    println!("{err}");
    assert!(
        err.contains("--batch-size") && err.contains("--grad-accum"),
        "{err}"
    );
    assert!(
        err.contains("--checkpointing") || err.contains("--seq-len"),
        "{err}"
    );
    assert!(check_fits(&cfg, n_params, &shape, 1, need).is_ok());
    Ok(())
}
