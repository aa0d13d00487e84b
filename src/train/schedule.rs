//! Learning-rate schedules: linear warm-up followed by constant, cosine or warmup-stable-decay.
//!
//! `step` is the 0-based index of the optimizer step about to be taken, as in HF's `LambdaLR`
//! schedules, so step 0 of a warm-up uses lr 0.

use serde::{Deserialize, Serialize};

use crate::{MorError, Result};

/// Fraction of the total steps used for warm-up when a schedule does not give `warmup`.
pub const DEFAULT_WARMUP_RATIO: f64 = 0.05;

/// A learning-rate schedule, serialised as e.g. `{"kind": "wsd", "total": 1000, "decay_fraction": 0.2}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Linear warm-up then constant. It has no horizon, so an unspecified warm-up means none.
    Constant {
        /// Warm-up steps (default 0).
        #[serde(default)]
        warmup: Option<usize>,
    },
    /// Linear warm-up then half-cosine decay to `min_lr_ratio * max_lr` at `total`.
    Cosine {
        /// Warm-up steps (default 5% of `total`, rounded up).
        #[serde(default)]
        warmup: Option<usize>,
        /// Total optimizer steps.
        total: usize,
        /// Final lr as a fraction of the peak (default 0, as HF's cosine schedule).
        #[serde(default)]
        min_lr_ratio: f64,
    },
    /// Warmup-stable-decay (the MoR paper's trapezoid): linear warm-up, plateau at the peak, then a
    /// linear cool-down to 0 over the last `decay_fraction * total` steps.
    Wsd {
        /// Warm-up steps (default 5% of `total`, rounded up).
        #[serde(default)]
        warmup: Option<usize>,
        /// Total optimizer steps.
        total: usize,
        /// Fraction of `total` spent in the final linear decay, in [0, 1].
        decay_fraction: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant { warmup: None }
    }
}

fn default_warmup(total: usize) -> usize {
    (total as f64 * DEFAULT_WARMUP_RATIO).ceil() as usize
}

impl LrSchedule {
    /// Warm-up steps after applying the default.
    pub fn warmup_steps(&self) -> usize {
        match *self {
            LrSchedule::Constant { warmup } => warmup.unwrap_or(0),
            LrSchedule::Cosine { warmup, total, .. } | LrSchedule::Wsd { warmup, total, .. } => {
                warmup.unwrap_or_else(|| default_warmup(total))
            }
        }
    }

    /// Total steps of the schedule, if it has a horizon.
    pub fn total_steps(&self) -> Option<usize> {
        match *self {
            LrSchedule::Constant { .. } => None,
            LrSchedule::Cosine { total, .. } | LrSchedule::Wsd { total, .. } => Some(total),
        }
    }

    /// Number of steps in the WSD cool-down (0 for other schedules).
    pub fn decay_steps(&self) -> usize {
        match *self {
            LrSchedule::Wsd {
                total,
                decay_fraction,
                ..
            } => (decay_fraction * total as f64).round() as usize,
            _ => 0,
        }
    }

    /// Check the parameters are consistent (call once, after loading a config).
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(MorError::Config(format!("lr schedule: {m}")));
        let warmup = self.warmup_steps();
        match *self {
            LrSchedule::Constant { .. } => Ok(()),
            LrSchedule::Cosine {
                total,
                min_lr_ratio,
                ..
            } => {
                if total == 0 {
                    return err("total must be > 0".into());
                }
                if warmup > total {
                    return err(format!("warmup {warmup} exceeds total {total}"));
                }
                if !(0.0..=1.0).contains(&min_lr_ratio) {
                    return err(format!(
                        "min_lr_ratio must be in [0, 1], got {min_lr_ratio}"
                    ));
                }
                Ok(())
            }
            LrSchedule::Wsd {
                total,
                decay_fraction,
                ..
            } => {
                if total == 0 {
                    return err("total must be > 0".into());
                }
                if !(0.0..=1.0).contains(&decay_fraction) {
                    return err(format!(
                        "decay_fraction must be in [0, 1], got {decay_fraction}"
                    ));
                }
                let decay = self.decay_steps();
                if warmup + decay > total {
                    return err(format!(
                        "warmup {warmup} + decay {decay} steps exceed total {total}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// Learning rate for 0-based optimizer step `step` given the peak `max_lr`. Steps past the
    /// horizon keep the final value.
    pub fn lr(&self, step: usize, max_lr: f64) -> f64 {
        let warmup = self.warmup_steps();
        if step < warmup {
            return max_lr * step as f64 / warmup as f64;
        }
        let factor = match *self {
            LrSchedule::Constant { .. } => 1.0,
            LrSchedule::Cosine {
                total,
                min_lr_ratio,
                ..
            } => {
                let span = total.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / span as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                min_lr_ratio + (1.0 - min_lr_ratio) * cosine
            }
            LrSchedule::Wsd { total, .. } => {
                let decay = self.decay_steps();
                let plateau_end = total.saturating_sub(decay);
                if step < plateau_end {
                    1.0
                } else if decay == 0 {
                    // No cool-down: the plateau lasts to the end and beyond.
                    1.0
                } else {
                    (1.0 - (step - plateau_end) as f64 / decay as f64).max(0.0)
                }
            }
        };
        max_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn constant_with_warmup() {
        let s = LrSchedule::Constant { warmup: Some(4) };
        s.validate().unwrap();
        let v: Vec<f64> = (0..6).map(|t| s.lr(t, 1.0)).collect();
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        assert_eq!(LrSchedule::default().lr(0, 3e-4), 3e-4);
    }

    #[test]
    fn wsd_trapezoid_boundaries() {
        // total 100, warm-up 10, cool-down 20: plateau on [10, 80), linear to 0 at 100.
        let s = LrSchedule::Wsd {
            warmup: Some(10),
            total: 100,
            decay_fraction: 0.2,
        };
        s.validate().unwrap();
        let lr = |t| s.lr(t, 2.0);
        assert!(close(lr(0), 0.0));
        assert!(close(lr(5), 1.0));
        assert!(close(lr(9), 1.8));
        assert!(close(lr(10), 2.0));
        assert!(close(lr(79), 2.0));
        assert!(close(lr(80), 2.0));
        assert!(close(lr(90), 1.0));
        assert!(close(lr(99), 0.1));
        assert!(close(lr(100), 0.0));
        assert!(close(lr(1000), 0.0));
    }

    #[test]
    fn wsd_default_warmup_is_five_percent() {
        let s = LrSchedule::Wsd {
            warmup: None,
            total: 1000,
            decay_fraction: 0.1,
        };
        assert_eq!(s.warmup_steps(), 50);
        assert!(close(s.lr(25, 1.0), 0.5));
        assert!(close(s.lr(50, 1.0), 1.0));
        // 5% of 30 = 1.5 rounds up.
        let small = LrSchedule::Cosine {
            warmup: None,
            total: 30,
            min_lr_ratio: 0.0,
        };
        assert_eq!(small.warmup_steps(), 2);
    }

    #[test]
    fn wsd_without_decay_stays_flat() {
        let s = LrSchedule::Wsd {
            warmup: Some(0),
            total: 10,
            decay_fraction: 0.0,
        };
        s.validate().unwrap();
        assert!(close(s.lr(0, 1.0), 1.0));
        assert!(close(s.lr(9, 1.0), 1.0));
        assert!(close(s.lr(50, 1.0), 1.0));
    }

    #[test]
    fn cosine_shape() {
        let s = LrSchedule::Cosine {
            warmup: Some(10),
            total: 110,
            min_lr_ratio: 0.1,
        };
        s.validate().unwrap();
        assert!(close(s.lr(10, 1.0), 1.0));
        assert!(close(s.lr(60, 1.0), 0.1 + 0.9 * 0.5));
        assert!(close(s.lr(110, 1.0), 0.1));
        assert!(close(s.lr(500, 1.0), 0.1));
        // Monotone non-increasing after warm-up.
        let v: Vec<f64> = (10..=110).map(|t| s.lr(t, 1.0)).collect();
        assert!(v.windows(2).all(|w| w[1] <= w[0] + 1e-15));
    }

    #[test]
    fn validation() {
        let bad = [
            LrSchedule::Wsd {
                warmup: Some(0),
                total: 10,
                decay_fraction: 1.5,
            },
            LrSchedule::Wsd {
                warmup: Some(9),
                total: 10,
                decay_fraction: 0.5,
            },
            LrSchedule::Wsd {
                warmup: None,
                total: 0,
                decay_fraction: 0.5,
            },
            LrSchedule::Cosine {
                warmup: Some(11),
                total: 10,
                min_lr_ratio: 0.0,
            },
            LrSchedule::Cosine {
                warmup: None,
                total: 10,
                min_lr_ratio: -0.1,
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        LrSchedule::Wsd {
            warmup: Some(5),
            total: 10,
            decay_fraction: 0.5,
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn serde_tagged() {
        let s: LrSchedule =
            serde_json::from_str(r#"{"kind":"wsd","total":100,"decay_fraction":0.2}"#).unwrap();
        assert_eq!(
            s,
            LrSchedule::Wsd {
                warmup: None,
                total: 100,
                decay_fraction: 0.2
            }
        );
        let back: LrSchedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let c: LrSchedule = serde_json::from_str(r#"{"kind":"constant"}"#).unwrap();
        assert_eq!(c, LrSchedule::Constant { warmup: None });
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind":"linear"}"#).is_err());
    }
}
