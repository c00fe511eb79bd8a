//! Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler`: the loss is multiplied by a
//! scale before backward so small fp16 gradients do not flush to zero; a step whose gradients
//! overflow is skipped and backs the scale off, and every `growth_interval` clean steps in a row
//! grow it. bf16 has fp32's range and needs none of this.

use serde::{Deserialize, Serialize};

/// `train.loss_scale:` (used with `train.precision: fp16`). PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleConfig {
    /// The first scale.
    pub init: f64,
    /// Multiplies the scale after `growth_interval` clean steps in a row.
    pub growth_factor: f64,
    /// Multiplies the scale after an overflow.
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScaleConfig {
    /// Range checks; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.init.is_finite() && self.init > 0.0) {
            return Err(format!(
                "train.loss_scale.init must be > 0, got {}",
                self.init
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(format!(
                "train.loss_scale.growth_factor must be > 1, got {}",
                self.growth_factor
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(format!(
                "train.loss_scale.backoff_factor must be in (0, 1), got {}",
                self.backoff_factor
            ));
        }
        if self.growth_interval == 0 {
            return Err("train.loss_scale.growth_interval must be > 0".into());
        }
        Ok(())
    }
}

/// Below this the scale cannot rescue fp16 gradients (2⁻²⁴ is fp16's smallest subnormal): an
/// overflow at such a scale is a genuinely non-finite gradient.
pub const MIN_SCALE: f64 = 1.0 / 16_777_216.0;

/// The scaler's state: what a checkpoint stores so a resumed run scales exactly as before.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    pub scale: f64,
    /// Clean steps since the last growth or overflow.
    pub clean_steps: u64,
    /// Steps skipped for overflow so far.
    pub overflows: u64,
}

#[derive(Debug, Clone)]
pub struct LossScaler {
    cfg: LossScaleConfig,
    state: LossScaleState,
}

impl LossScaler {
    pub fn new(cfg: &LossScaleConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            state: LossScaleState {
                scale: cfg.init,
                clean_steps: 0,
                overflows: 0,
            },
        }
    }

    /// Continues from a checkpoint's state.
    pub fn restore(&mut self, state: LossScaleState) {
        self.state = state;
    }

    pub fn state(&self) -> LossScaleState {
        self.state
    }

    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// A step's gradients overflowed: back off. False once the scale is too small to help.
    pub fn overflowed(&mut self) -> bool {
        self.state.scale *= self.cfg.backoff_factor;
        self.state.clean_steps = 0;
        self.state.overflows += 1;
        self.state.scale >= MIN_SCALE
    }

    /// A step was taken with finite gradients: grow after enough of them in a row.
    pub fn stepped(&mut self) {
        self.state.clean_steps += 1;
        if self.state.clean_steps == self.cfg.growth_interval {
            self.state.scale *= self.cfg.growth_factor;
            self.state.clean_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let cfg = LossScaleConfig {
            growth_interval: 3,
            ..LossScaleConfig::default()
        };
        let mut s = LossScaler::new(&cfg);
        assert_eq!(s.scale(), 65536.0);
        assert!(s.overflowed());
        assert_eq!(s.scale(), 32768.0);
        s.stepped();
        s.stepped();
        assert_eq!(s.scale(), 32768.0);
        // An overflow restarts the count.
        assert!(s.overflowed());
        s.stepped();
        s.stepped();
        assert_eq!(s.scale(), 16384.0);
        s.stepped();
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.state().overflows, 2);
        assert_eq!(s.state().clean_steps, 0);
    }

    #[test]
    fn gives_up_below_fp16_range() {
        let mut s = LossScaler::new(&LossScaleConfig {
            init: 1.0,
            ..LossScaleConfig::default()
        });
        let mut halvings = 0;
        while s.overflowed() {
            halvings += 1;
        }
        assert_eq!(halvings, 24);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = LossScaleConfig {
            backoff_factor: 1.5,
            ..LossScaleConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("train.loss_scale.backoff_factor"));
    }
}
