//! Helpers shared by the integration tests: random tensors, small models with non-degenerate routers, comparisons.
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mor::config::ModelConfig;
use mor::model::params::ParamStore;
use mor::model::token_choice::BIAS_NAME;
use mor::model::MorModel;
use mor::Result;

/// The device every test runs on.
pub const DEV: Device = Device::Cpu;

/// One standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A tensor of N(mean, std²) draws in `dtype`.
pub fn randn(
    rng: &mut StdRng,
    dims: &[usize],
    mean: f64,
    std: f64,
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f64> = (0..n).map(|_| mean + std * normal(rng)).collect();
    Ok(Tensor::from_vec(data, dims, &DEV)?.to_dtype(dtype)?)
}

/// A small model in `dtype` whose routing decisions are non-degenerate: the first router layer re-drawn from
/// N(0, 2²), the second layer of an MLP router from N(0, (2/√h)²) so its logits stay O(1) instead of saturating,
/// norms at 1 + N(0, 0.2²) and, with loss-free balancing, a random bias of std `bias_std` (the size of the α-scaled
/// probabilities, so it changes decisions).
pub fn routed_model(json: &str, seed: u64, dtype: DType, bias_std: f64) -> Result<MorModel> {
    let cfg = ModelConfig::from_json(json)?;
    let model = MorModel::init(&cfg, ParamStore::with_dtype(&DEV, seed, dtype))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    for (name, v) in model.params().iter() {
        let dims = v.dims();
        let t = if name == BIAS_NAME {
            randn(&mut rng, dims, 0.0, bias_std, dtype)?
        } else if name.contains("router") && name.ends_with(".2.weight") {
            randn(&mut rng, dims, 0.0, 2.0 / (dims[1] as f64).sqrt(), dtype)?
        } else if name.contains("router") {
            randn(&mut rng, dims, 0.0, 2.0, dtype)?
        } else if name.contains("norm") {
            randn(&mut rng, dims, 1.0, 0.2, dtype)?
        } else {
            continue;
        };
        v.set(&t)?;
    }
    Ok(model)
}

/// max |a − b| over all elements, in f32 (whatever the two dtypes).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("a float tensor");
    (f32(a) - f32(b))
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}
