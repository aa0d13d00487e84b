//! AdamW with decoupled weight decay (torch.optim.AdamW semantics) and global-norm gradient clipping.
//!
//! The moments are tensors. On CPU the update runs as three in-place fused passes per parameter
//! (first moment, second moment, parameter), which measured ~20x faster than the equivalent chain
//! of ~10 allocating candle ops; other devices use that op chain.

use std::collections::{HashMap, HashSet};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var, WithDType,
};
use serde::{Deserialize, Serialize};

use crate::{MorError, Result};

/// A trainable parameter with the name used in checkpoints and whether weight decay applies to it.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Stable name (e.g. `"layers.0.attn.q_proj.weight"`); optimizer state is keyed by it.
    pub name: String,
    /// The variable updated in place by the optimizer.
    pub var: Var,
    /// Apply decoupled weight decay (false for norm weights and biases, as in the paper's recipe).
    pub decay: bool,
}

impl NamedParam {
    /// Build a parameter, deciding `decay` with [`decay_by_name`].
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let decay = decay_by_name(&name, var.rank());
        Self { name, var, decay }
    }
}

/// Heuristic for the official recipe's decay split: no decay for 1-D tensors (norm gains, biases)
/// or for any parameter whose name mentions a norm or a bias.
pub fn decay_by_name(name: &str, rank: usize) -> bool {
    let lower = name.to_ascii_lowercase();
    rank >= 2 && !lower.contains("norm") && !lower.contains("bias")
}

/// AdamW hyper-parameters other than the learning rate (which comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the bias-corrected RMS of the gradient for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay coefficient (multiplied by the learning rate, as torch does).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The MoR paper / official code recipe: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Reject values for which the update is undefined or meaningless.
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(MorError::Config(format!(
                    "adamw {name} must be in [0, 1), got {b}"
                )));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(MorError::Config(format!(
                "adamw eps must be positive, got {}",
                self.eps
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(MorError::Config(format!(
                "adamw weight_decay must be >= 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// Per-parameter state. `step` is per parameter (like torch) so a parameter that received no
/// gradient on some steps still gets the right bias correction.
#[derive(Debug)]
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over one parameter group. Use a second instance for a group that needs different
/// hyper-parameters (e.g. an auxiliary router); each instance checkpoints its own state.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<NamedParam>,
    states: Vec<ParamState>,
    cfg: AdamWConfig,
    step: u64,
    /// Use the in-place CPU kernels when applicable (off only in tests, to compare both paths).
    fused: bool,
}

/// Suffixes of the state tensors of a parameter in [`AdamW::state_tensors`].
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

impl AdamW {
    /// Create the optimizer with zeroed moments. Names must be unique and parameters floating point.
    pub fn new(params: Vec<NamedParam>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for p in &params {
            if !seen.insert(p.name.as_str()) {
                return Err(MorError::Config(format!(
                    "duplicate optimizer parameter name {:?}",
                    p.name
                )));
            }
            if !p.var.dtype().is_float() {
                return Err(MorError::Config(format!(
                    "parameter {:?} has non-float dtype {:?}",
                    p.name,
                    p.var.dtype()
                )));
            }
            // Two allocations: the moments are updated in place and must not share storage.
            states.push(ParamState {
                exp_avg: p.var.as_tensor().zeros_like()?,
                exp_avg_sq: p.var.as_tensor().zeros_like()?,
                step: 0,
            });
        }
        Ok(Self {
            params,
            states,
            cfg,
            step: 0,
            fused: true,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// The variables, e.g. for [`clip_grad_norm`].
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().map(|p| &p.var).collect()
    }

    /// Number of [`AdamW::step`] calls so far (including restored ones).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Apply one update with learning rate `lr`. Parameters without a gradient in `grads` are
    /// left untouched (no decay either), as torch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(MorError::Config(format!(
                "learning rate must be finite and >= 0, got {lr}"
            )));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        // Check every gradient before touching any parameter, so a bad store changes nothing.
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                if g.dims() != p.var.dims() {
                    return Err(MorError::Config(format!(
                        "gradient of {:?} has shape {:?}, parameter has {:?}",
                        p.name,
                        g.dims(),
                        p.var.dims()
                    )));
                }
            }
        }
        for (p, st) in self.params.iter().zip(self.states.iter_mut()) {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = if g.dtype() == p.var.dtype() {
                g.clone()
            } else {
                g.to_dtype(p.var.dtype())?
            };
            st.step += 1;
            // beta^t underflows to 0 long before t leaves i32.
            let t = i32::try_from(st.step).unwrap_or(i32::MAX);
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            let update = ParamUpdate {
                decay: if p.decay {
                    1.0 - lr * weight_decay
                } else {
                    1.0
                },
                step_size: lr / bc1,
                inv_sqrt_bc2: 1.0 / bc2.sqrt(),
                eps,
            };
            let w = p.var.as_tensor();
            if self.fused && matches!(w.device(), Device::Cpu) {
                let g = g.contiguous()?;
                st.exp_avg.inplace_op2(
                    &g,
                    &MomentUpdate {
                        beta: beta1,
                        square: false,
                    },
                )?;
                st.exp_avg_sq.inplace_op2(
                    &g,
                    &MomentUpdate {
                        beta: beta2,
                        square: true,
                    },
                )?;
                w.inplace_op3(&st.exp_avg, &st.exp_avg_sq, &update)?;
            } else {
                // m <- b1*m + (1-b1)*g ; v <- b2*v + (1-b2)*g^2
                let m = ((&st.exp_avg * beta1)? + (&g * (1.0 - beta1))?)?;
                let v = ((&st.exp_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                // denom = sqrt(v)/sqrt(bc2) + eps, folded into one affine.
                let denom = v.sqrt()?.affine(update.inv_sqrt_bc2, eps)?;
                // Decoupled decay first (p *= 1 - lr*wd), then the Adam step, in one expression.
                let w = w.detach();
                let scaled = if update.decay != 1.0 {
                    w.affine(update.decay, 0.0)?
                } else {
                    w
                };
                let new_w = (scaled - (m.div(&denom)? * update.step_size)?)?;
                p.var.set(&new_w)?;
                st.exp_avg = m;
                st.exp_avg_sq = v;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// Optimizer state for checkpointing: `"{param}.exp_avg"`, `"{param}.exp_avg_sq"` (parameter
    /// dtype and shape) and `"{param}.step"` (f64 scalar, exact for any realistic step count).
    /// The moments are copies, since the live ones are updated in place by later steps.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.params.len() * 3);
        for (p, st) in self.params.iter().zip(&self.states) {
            out.insert(format!("{}.{EXP_AVG}", p.name), st.exp_avg.copy()?);
            out.insert(format!("{}.{EXP_AVG_SQ}", p.name), st.exp_avg_sq.copy()?);
            let step = Tensor::new(st.step as f64, &Device::Cpu)?;
            out.insert(format!("{}.{STEP}", p.name), step);
        }
        Ok(out)
    }

    /// Restore state saved by [`AdamW::state_tensors`]; `step` is the global step count. Every
    /// parameter must have all three entries with matching shape, and no extra entry may exist,
    /// so a checkpoint from a different model fails loudly instead of silently resetting moments.
    /// On error the optimizer is unchanged.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let mut problems = Vec::new();
        let mut expected = HashSet::with_capacity(self.params.len() * 3);
        let mut new_states = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let dev = p.var.device();
            let mut moment = |suffix: &str| -> Result<Option<Tensor>> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.get(&key);
                expected.insert(key.clone());
                match t {
                    None => {
                        problems.push(format!("missing {key}"));
                        Ok(None)
                    }
                    Some(t) if t.dims() != p.var.dims() => {
                        problems.push(format!(
                            "{key} has shape {:?}, parameter has {:?}",
                            t.dims(),
                            p.var.dims()
                        ));
                        Ok(None)
                    }
                    // Own copy: the moments are updated in place and must not alias the caller's.
                    Some(t) => Ok(Some(t.to_dtype(p.var.dtype())?.to_device(dev)?.copy()?)),
                }
            };
            let m = moment(EXP_AVG)?;
            let v = moment(EXP_AVG_SQ)?;
            let key = format!("{}.{STEP}", p.name);
            let pstep = match tensors.get(&key) {
                None => {
                    problems.push(format!("missing {key}"));
                    None
                }
                Some(t) if t.elem_count() != 1 => {
                    problems.push(format!("{key} must be a scalar, has shape {:?}", t.dims()));
                    None
                }
                Some(t) => {
                    let s = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
                    if s < 0.0 || s.fract() != 0.0 || s > u64::MAX as f64 {
                        problems.push(format!("{key} is not a step count: {s}"));
                        None
                    } else {
                        Some(s as u64)
                    }
                }
            };
            expected.insert(key);
            if let (Some(exp_avg), Some(exp_avg_sq), Some(step)) = (m, v, pstep) {
                new_states.push(ParamState {
                    exp_avg,
                    exp_avg_sq,
                    step,
                });
            }
        }
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
        extra.sort();
        for k in extra {
            problems.push(format!("unexpected optimizer tensor {k}"));
        }
        if !problems.is_empty() {
            let shown = problems.len().min(10);
            let more = problems.len() - shown;
            let mut msg = problems[..shown].join("; ");
            if more > 0 {
                msg.push_str(&format!("; and {more} more"));
            }
            return Err(MorError::Config(format!(
                "optimizer state does not match parameters: {msg}"
            )));
        }
        self.states = new_states;
        self.step = step;
        Ok(())
    }
}

/// `dst <- beta*dst + (1-beta)*x` with `x = g` or `g^2`: an Adam moment update, in place.
struct MomentUpdate {
    beta: f64,
    square: bool,
}

/// `p <- p*decay - step_size * m / (sqrt(v)*inv_sqrt_bc2 + eps)`: decoupled decay plus the
/// bias-corrected Adam step, in place.
#[derive(Clone, Copy)]
struct ParamUpdate {
    decay: f64,
    step_size: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
}

/// The contiguous element range of a layout; the fused kernels only handle that case (the
/// optimizer's own tensors always are, gradients are made contiguous first).
fn span(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} is not contiguous")))
}

fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = span(l, what)?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Mutable view of a float CPU storage as `T`. `WithDType` has no mutable accessor, so match.
macro_rules! with_float_slice_mut {
    ($storage:expr, $layout:expr, |$t:ident, $dst:ident| $body:expr) => {{
        let (a, b) = span($layout, "destination")?;
        match $storage {
            CpuStorage::F32(v) => {
                type $t = f32;
                let $dst = &mut v[a..b];
                $body
            }
            CpuStorage::F64(v) => {
                type $t = f64;
                let $dst = &mut v[a..b];
                $body
            }
            CpuStorage::BF16(v) => {
                type $t = half::bf16;
                let $dst = &mut v[a..b];
                $body
            }
            CpuStorage::F16(v) => {
                type $t = half::f16;
                let $dst = &mut v[a..b];
                $body
            }
            other => Err(candle_core::Error::Msg(format!(
                "adamw: unsupported dtype {:?}",
                other.dtype()
            ))),
        }
    }};
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (beta, one_m) = (self.beta, 1.0 - self.beta);
        with_float_slice_mut!(s1, l1, |T, dst| {
            let g: &[T] = slice(s2, l2, "gradient")?;
            if g.len() != dst.len() {
                return Err(candle_core::Error::Msg(
                    "adamw: gradient size mismatch".into(),
                ));
            }
            if self.square {
                for (d, &x) in dst.iter_mut().zip(g) {
                    let x = x.to_f64();
                    *d = T::from_f64(beta * d.to_f64() + one_m * x * x);
                }
            } else {
                for (d, &x) in dst.iter_mut().zip(g) {
                    *d = T::from_f64(beta * d.to_f64() + one_m * x.to_f64());
                }
            }
            Ok(())
        })
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let u = *self;
        with_float_slice_mut!(s1, l1, |T, dst| {
            let m: &[T] = slice(s2, l2, "exp_avg")?;
            let v: &[T] = slice(s3, l3, "exp_avg_sq")?;
            if m.len() != dst.len() || v.len() != dst.len() {
                return Err(candle_core::Error::Msg("adamw: state size mismatch".into()));
            }
            for ((p, &m), &v) in dst.iter_mut().zip(m).zip(v) {
                let denom = v.to_f64().sqrt() * u.inv_sqrt_bc2 + u.eps;
                *p = T::from_f64(p.to_f64() * u.decay - u.step_size * m.to_f64() / denom);
            }
            Ok(())
        })
    }
}

/// Scale all gradients of `params` so their global L2 norm is at most `max_norm`, and return the
/// norm before clipping (torch `clip_grad_norm_` semantics: factor `max_norm / (norm + 1e-6)`,
/// applied only when `norm > max_norm`). Parameters without a gradient are ignored. A non-finite
/// norm is returned as is and the gradients are left untouched so the caller can skip the step.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&Var], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(MorError::Config(format!(
            "max grad norm must be > 0, got {max_norm}"
        )));
    }
    // A variable listed twice must be counted and scaled once.
    let mut seen = HashSet::new();
    let params: Vec<&Var> = params
        .iter()
        .copied()
        .filter(|v| seen.insert(v.as_tensor().id()))
        .collect();
    let mut sq = 0.0f64;
    for v in &params {
        if let Some(g) = grads.get(v.as_tensor()) {
            // Sum per tensor in f32 (f64 kept as is), accumulate across tensors on the host in f64.
            let g = if g.dtype() == DType::F64 {
                g.clone()
            } else {
                g.to_dtype(DType::F32)?
            };
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for v in &params {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Straightforward scalar torch.optim.AdamW, the reference for the tensor implementation.
    struct RefAdamW {
        p: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl RefAdamW {
        // Indexing mirrors the textbook formula, which is the point of a reference.
        #[allow(clippy::needless_range_loop)]
        fn step(&mut self, g: &[f64], lr: f64, cfg: &AdamWConfig, decay: bool) {
            self.t += 1;
            let bc1 = 1.0 - cfg.beta1.powi(self.t);
            let bc2 = 1.0 - cfg.beta2.powi(self.t);
            for i in 0..self.p.len() {
                if decay {
                    self.p[i] -= lr * cfg.weight_decay * self.p[i];
                }
                self.m[i] = cfg.beta1 * self.m[i] + (1.0 - cfg.beta1) * g[i];
                self.v[i] = cfg.beta2 * self.v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                let m_hat = self.m[i] / bc1;
                let v_hat = self.v[i] / bc2;
                self.p[i] -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
            }
        }
    }

    fn grads_for(var: &Var, g: &[f64]) -> GradStore {
        // Build a real GradStore via backward of sum(var * g): d/dvar = g.
        let gt = Tensor::from_slice(g, var.dims(), var.device())
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        (var.as_tensor() * gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn run_against_reference(dtype: DType, decay: bool, fused: bool, tol: f64) {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let init = [0.5, -1.25, 2.0, 0.0, 3.5, -0.75];
        let var = Var::from_tensor(
            &Tensor::from_slice(&init, (2, 3), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(
            vec![NamedParam {
                name: "w".into(),
                var: var.clone(),
                decay,
            }],
            cfg,
        )
        .unwrap();
        opt.fused = fused;
        let mut r = RefAdamW {
            p: init.to_vec(),
            m: vec![0.0; 6],
            v: vec![0.0; 6],
            t: 0,
        };
        let gs = [
            [0.1, -0.2, 0.3, 1e-3, -5.0, 0.0],
            [-0.4, 0.2, 0.1, 2.0, -1.0, 0.5],
            [0.05, 0.05, -0.3, 0.0, 0.7, -0.2],
            [1.0, -1.0, 0.0, 0.3, 0.2, 0.1],
        ];
        let lrs = [1e-2, 3e-2, 5e-3, 1e-1];
        for (g, lr) in gs.iter().zip(lrs) {
            let grads = grads_for(&var, g);
            opt.step(&grads, lr).unwrap();
            r.step(g, lr, &cfg, decay);
            let got: Vec<f64> = var
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in got.iter().zip(&r.p) {
                assert!((a - b).abs() <= tol, "got {got:?}, want {:?}", r.p);
            }
        }
        assert_eq!(opt.step_count(), 4);
    }

    #[test]
    fn adamw_matches_scalar_reference_f64_with_decay() {
        for fused in [true, false] {
            run_against_reference(DType::F64, true, fused, 1e-12);
        }
    }

    #[test]
    fn adamw_matches_scalar_reference_f64_without_decay() {
        for fused in [true, false] {
            run_against_reference(DType::F64, false, fused, 1e-12);
        }
    }

    #[test]
    fn adamw_matches_scalar_reference_f32() {
        for fused in [true, false] {
            run_against_reference(DType::F32, true, fused, 1e-5);
        }
    }

    #[test]
    fn adamw_bf16_fused_close_to_reference() {
        run_against_reference(DType::BF16, true, true, 2e-2);
    }

    #[test]
    fn fused_update_is_in_place_and_visible_through_clones() {
        // The model holds clones of the Var's tensor; they must see the update.
        let var = Var::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let alias = var.as_tensor().clone();
        let mut opt = AdamW::new(
            vec![NamedParam::new("w", var.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.step(&grads_for(&var, &[1.0, 1.0]), 0.1).unwrap();
        let a = alias.to_vec1::<f32>().unwrap();
        assert!(
            (a[0] - 0.9).abs() < 1e-5 && (a[1] + 1.1).abs() < 1e-5,
            "{a:?}"
        );
        // A state snapshot does not change when training continues.
        let snap = opt.state_tensors().unwrap()["w.exp_avg"]
            .to_vec1::<f32>()
            .unwrap();
        let st = opt.state_tensors().unwrap();
        opt.step(&grads_for(&var, &[1.0, 1.0]), 0.1).unwrap();
        assert_eq!(st["w.exp_avg"].to_vec1::<f32>().unwrap(), snap);
    }

    #[test]
    fn noncontiguous_gradient_is_handled() {
        let var = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!g.is_contiguous());
        let mut grads = grads_for(&var, &[0.0; 6]);
        grads.insert(var.as_tensor(), g.clone());
        let mut a = AdamW::new(
            vec![NamedParam::new("w", var.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        a.step(&grads, 0.01).unwrap();
        let fused = var.as_tensor().to_vec2::<f32>().unwrap();
        let var2 = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let mut grads2 = grads_for(&var2, &[0.0; 6]);
        grads2.insert(var2.as_tensor(), g);
        let mut b = AdamW::new(
            vec![NamedParam::new("w", var2.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        b.fused = false;
        b.step(&grads2, 0.01).unwrap();
        // Same values up to rounding (the fused kernel computes in f64).
        let plain = var2.as_tensor().to_vec2::<f32>().unwrap();
        for (x, y) in fused.iter().flatten().zip(plain.iter().flatten()) {
            assert!((x - y).abs() < 1e-6, "{fused:?} vs {plain:?}");
        }
    }

    #[test]
    fn adamw_first_step_is_lr_times_sign() {
        // With bias correction the first update is lr * g/|g| (up to eps), independent of |g|.
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let var = Var::new(&[1.0f64, 1.0, 1.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![NamedParam::new("w", var.clone())], cfg).unwrap();
        opt.step(&grads_for(&var, &[1e-3, -7.0, 250.0]), 0.1)
            .unwrap();
        let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        let want = [0.9, 1.1, 0.9];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn params_without_grad_are_skipped_and_step_per_param() {
        let a = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![
                NamedParam {
                    name: "a".into(),
                    var: a.clone(),
                    decay: true,
                },
                NamedParam {
                    name: "b".into(),
                    var: b.clone(),
                    decay: true,
                },
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.step(&grads_for(&a, &[0.5, 0.5]), 0.01).unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f64>().unwrap(), vec![3.0, 4.0]);
        let st = opt.state_tensors().unwrap();
        assert_eq!(st["a.step"].to_scalar::<f64>().unwrap(), 1.0);
        assert_eq!(st["b.step"].to_scalar::<f64>().unwrap(), 0.0);
        // b's first real step must be bias-corrected as a first step: exactly lr*sign (+ decay).
        opt.step(&grads_for(&b, &[1.0, -1.0]), 0.01).unwrap();
        let got = b.as_tensor().to_vec1::<f64>().unwrap();
        let want = [3.0 * (1.0 - 0.001) - 0.01, 4.0 * (1.0 - 0.001) + 0.01];
        for (x, y) in got.iter().zip(want) {
            assert!((x - y).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn state_roundtrip_and_validation() {
        let mk = || {
            let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
            let n = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
            let opt = AdamW::new(
                vec![
                    NamedParam::new("l.weight", w.clone()),
                    NamedParam::new("norm.weight", n.clone()),
                ],
                AdamWConfig::default(),
            )
            .unwrap();
            (w, n, opt)
        };
        let (w1, n1, mut o1) = mk();
        assert!(o1.params()[0].decay && !o1.params()[1].decay);
        let loss = |w: &Var, n: &Var| {
            (w.as_tensor().sqr().unwrap().sum_all().unwrap() + n.as_tensor().sum_all().unwrap())
                .unwrap()
        };
        for _ in 0..3 {
            let g = loss(&w1, &n1).backward().unwrap();
            o1.step(&g, 1e-2).unwrap();
        }
        let state = o1.state_tensors().unwrap();
        assert_eq!(state.len(), 6);

        let (w2, n2, mut o2) = mk();
        w2.set(w1.as_tensor()).unwrap();
        n2.set(n1.as_tensor()).unwrap();
        o2.load_state(&state, o1.step_count()).unwrap();
        assert_eq!(o2.step_count(), 3);
        o1.step(&loss(&w1, &n1).backward().unwrap(), 1e-2).unwrap();
        o2.step(&loss(&w2, &n2).backward().unwrap(), 1e-2).unwrap();
        assert_eq!(
            w1.as_tensor().to_vec2::<f32>().unwrap(),
            w2.as_tensor().to_vec2::<f32>().unwrap()
        );

        // Missing, wrong-shape and extra entries are all reported.
        let mut bad = state.clone();
        bad.remove("norm.weight.exp_avg");
        bad.insert(
            "l.weight.exp_avg_sq".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        bad.insert(
            "ghost.exp_avg".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let before = o2.state_tensors().unwrap()["l.weight.exp_avg"]
            .to_vec2::<f32>()
            .unwrap();
        let err = o2.load_state(&bad, 0).unwrap_err().to_string();
        assert!(err.contains("missing norm.weight.exp_avg"), "{err}");
        assert!(err.contains("l.weight.exp_avg_sq has shape [3]"), "{err}");
        assert!(
            err.contains("unexpected optimizer tensor ghost.exp_avg"),
            "{err}"
        );
        // Failed load leaves the optimizer unchanged.
        assert_eq!(o2.step_count(), 4);
        let after = o2.state_tensors().unwrap()["l.weight.exp_avg"]
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn new_rejects_bad_input() {
        let v = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let dup = vec![
            NamedParam::new("x", v.clone()),
            NamedParam::new("x", v.clone()),
        ];
        assert!(AdamW::new(dup, AdamWConfig::default()).is_err());
        let cfg = AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        };
        assert!(AdamW::new(vec![NamedParam::new("x", v.clone())], cfg).is_err());
        let mut opt = AdamW::new(
            vec![NamedParam::new("x", v.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let g = grads_for(&v, &[1.0]);
        assert!(opt.step(&g, f64::NAN).is_err());
    }

    #[test]
    fn decay_heuristic() {
        assert!(decay_by_name("layers.0.mlp.up.weight", 2));
        assert!(!decay_by_name("layers.0.attn_norm.weight", 1));
        assert!(!decay_by_name("final_norm.weight", 2));
        assert!(!decay_by_name("router.bias", 1));
        assert!(!decay_by_name("router.gate", 1));
    }

    #[test]
    fn clip_scales_only_above_max() {
        let a = Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        let b = Var::new(&[[0.0f32, 4.0]], &Device::Cpu).unwrap();
        let mk_grads = || {
            // grads: a -> [3, 0], b -> [[0, 4]] so the global norm is 5.
            let l = ((a.as_tensor().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap()
                + (b.as_tensor().sqr().unwrap() * 0.5)
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            l.backward().unwrap()
        };
        let mut g = mk_grads();
        let n = clip_grad_norm(&mut g, &[&a, &b, &a], 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let coef = 1.0 / (5.0 + 1e-6);
        let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let gb = g.get(b.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!((ga[0] as f64 - 3.0 * coef).abs() < 1e-6, "{ga:?}");
        assert!((gb[0][1] as f64 - 4.0 * coef).abs() < 1e-6, "{gb:?}");

        let mut g = mk_grads();
        let n = clip_grad_norm(&mut g, &[&a, &b], 10.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        assert_eq!(
            g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 0.0]
        );
        assert!(clip_grad_norm(&mut g, &[&a], 0.0).is_err());
    }
}
