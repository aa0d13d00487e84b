//! Named trainable parameters. Shared weights are one [`Var`] referenced by every layer that uses it, so their
//! gradients accumulate in one place, exactly like the official code's aliased `nn.Parameter`s.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::error::{MorError, Result};

/// How a freshly created parameter is initialised (docs/architecture.md S1: HF `_init_weights`).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// N(0, std²).
    Normal(f64),
    /// All ones (RMSNorm weights).
    Ones,
    /// All zeros (buffers such as the loss-free balancing bias).
    Zeros,
}

/// An ordered map from canonical parameter name to its variable.
#[derive(Debug, Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    requested: BTreeSet<String>,
    device: Device,
    dtype: DType,
    rng: rand::rngs::StdRng,
    /// Hand out detached tensors (no autograd tracking) to model builds; see [`ParamStore::frozen`].
    frozen: bool,
    /// [`ParamStore::insert_placeholder`]: zero views that hold no memory.
    placeholders: BTreeMap<String, Tensor>,
}

impl ParamStore {
    /// An empty f32 store whose random initialisation is reproducible from `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        Self::with_dtype(device, seed, DType::F32)
    }

    /// An empty store of the given float dtype (f64 for gradient checks).
    pub fn with_dtype(device: &Device, seed: u64, dtype: DType) -> Self {
        ParamStore {
            dtype,
            vars: BTreeMap::new(),
            requested: BTreeSet::new(),
            device: device.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            frozen: false,
            placeholders: BTreeMap::new(),
        }
    }

    /// The same parameters (shared storage, so later updates show through) for inference: a model built on this
    /// store computes without autograd tracking. With trainable variables every intermediate of a forward pass
    /// stays referenced by the graph until the output is dropped, which for long windows and a 49K vocabulary runs
    /// to gigabytes.
    pub fn frozen(&self) -> ParamStore {
        ParamStore {
            frozen: true,
            requested: BTreeSet::new(),
            ..self.clone()
        }
    }

    /// The same parameters converted to `dtype` (copies; frozen as this store is).
    pub fn to_dtype(&self, dtype: DType) -> Result<ParamStore> {
        if !self.placeholders.is_empty() {
            return Err(MorError::Config(
                "a model with placeholder weights (quantized) cannot change dtype".into(),
            ));
        }
        let mut out = ParamStore::with_dtype(&self.device, 0, dtype);
        for (name, v) in &self.vars {
            out.insert(name, v.as_tensor())?;
        }
        out.frozen = self.frozen;
        Ok(out)
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Return the parameter `name`, creating it with `init` if it does not exist yet. An existing parameter must
    /// have the requested shape.
    pub fn get_or_init(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.requested.insert(name.to_string());
        if let Some(t) = self.placeholders.get(name) {
            if t.dims() != shape {
                return Err(MorError::Config(format!(
                    "parameter {name}: expected shape {shape:?}, found {:?}",
                    t.dims()
                )));
            }
            return Ok(t.clone());
        }
        if let Some(v) = self.vars.get(name) {
            if v.dims() != shape {
                return Err(MorError::Config(format!(
                    "parameter {name}: expected shape {shape:?}, found {:?}",
                    v.dims()
                )));
            }
            return Ok(if self.frozen {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            });
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => (0..n)
                .map(|_| (std * standard_normal(&mut self.rng)) as f32)
                .collect(),
        };
        let t = Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// Insert (or replace) a parameter from an existing tensor, converting to the store's dtype.
    pub fn insert(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
        self.vars.insert(name.to_string(), Var::from_tensor(&t)?);
        Ok(())
    }

    /// Insert the variable `var` as parameter `name` as it is (no copy) when it has the store's dtype and device;
    /// otherwise as [`ParamStore::insert`] does.
    pub fn insert_var(&mut self, name: &str, var: Var) -> Result<()> {
        if var.dtype() != self.dtype || !var.device().same_device(&self.device) {
            return self.insert(name, var.as_tensor());
        }
        self.vars.insert(name.to_string(), var);
        Ok(())
    }

    /// Insert a placeholder for parameter `name`: an all-zero view of `shape` backed by a single element (stride 0),
    /// for weights a quantized engine holds in another form and never reads here. It is not a trainable variable
    /// and not listed by [`ParamStore::iter`]; a model computes zeros wherever it reads it.
    pub fn insert_placeholder(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let t = Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?;
        self.placeholders.insert(name.to_string(), t);
        Ok(())
    }

    /// Whether a model build asked for `name` (to detect unexpected tensors in a checkpoint).
    pub fn was_requested(&self, name: &str) -> bool {
        self.requested.contains(name)
    }

    /// The variable `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// All parameters in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Number of distinct parameters.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True if the store holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalar parameters (each shared weight counted once).
    pub fn num_scalars(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Name → tensor map for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Overwrite the value of an existing parameter in place (used by the loss-free balancing bias update and by
    /// loading). The shape must match.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let v = self
            .vars
            .get(name)
            .ok_or_else(|| MorError::Config(format!("unknown parameter {name}")))?;
        if v.dims() != value.dims() {
            return Err(MorError::Config(format!(
                "parameter {name}: expected shape {:?}, got {:?}",
                v.dims(),
                value.dims()
            )));
        }
        v.set(&value.to_dtype(v.dtype())?)?;
        Ok(())
    }
}

/// One draw of N(0, 1) by the Box–Muller transform (candle's CPU randn cannot be seeded).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_reproducible_and_shared_names_return_one_var() {
        let dev = Device::Cpu;
        let mut a = ParamStore::new(&dev, 7);
        let mut b = ParamStore::new(&dev, 7);
        let ta = a.get_or_init("w", &[4, 8], Init::Normal(0.02)).unwrap();
        let tb = b.get_or_init("w", &[4, 8], Init::Normal(0.02)).unwrap();
        let da: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let db: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(da, db);
        let again = a.get_or_init("w", &[4, 8], Init::Normal(0.02)).unwrap();
        assert_eq!(again.id(), ta.id());
        assert!(a.get_or_init("w", &[8, 4], Init::Ones).is_err());
        let std = (da.iter().map(|x| x * x).sum::<f32>() / 32.0).sqrt();
        assert!(std > 0.005 && std < 0.05, "std {std}");
    }
}
