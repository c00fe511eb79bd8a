//! Exponential moving average of the weights; sampling and export use it.

use crate::multi_tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{nn::VarStore, Tensor};

#[derive(Debug)]
pub struct Ema {
    decay: f64,
    warmup: bool,
    updates: u64,
    /// (name, live variable, shadow copy), in name order: every variable, or under ZeRO-1 those
    /// this rank owns.
    params: Vec<(String, Tensor, Tensor)>,
}

impl Ema {
    pub fn new(vs: &VarStore, decay: f64, warmup: bool) -> Self {
        Self::sharded(vs, decay, warmup, |_| true)
    }

    /// Shadowing only the variables `owns` names (ZeRO-1: see [`crate::shard`]).
    pub fn sharded(vs: &VarStore, decay: f64, warmup: bool, owns: impl Fn(&str) -> bool) -> Self {
        let params = crate::named_variables(vs)
            .into_iter()
            .filter(|(n, _)| owns(n))
            .map(|(n, v)| {
                let shadow = v.detach().copy();
                (n, v, shadow)
            });
        Self {
            decay,
            warmup,
            updates: 0,
            params: params.collect(),
        }
    }

    /// The decay used at the next update.
    pub fn current_decay(&self) -> f64 {
        if self.warmup {
            let n = self.updates as f64;
            self.decay.min((1.0 + n) / (10.0 + n))
        } else {
            self.decay
        }
    }

    /// shadow ← d · shadow + (1 − d) · live, as one multi-tensor lerp (torch's foreach EMA).
    pub fn update(&mut self) -> Result<()> {
        let d = self.current_decay();
        let (shadows, live): (Vec<&Tensor>, Vec<&Tensor>) =
            self.params.iter().map(|(_, v, s)| (s, v)).unzip();
        multi_tensor::lerp_(&shadows, &live, 1.0 - d)?;
        self.updates += 1;
        Ok(())
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, _, s)| (n.clone(), s.shallow_clone()))
            .collect()
    }

    /// Restores the shadow weights (of the variables this rank keeps); each must be present with
    /// its shape.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, _, shadow) in &mut self.params {
            let Some(src) = tensors.get(name.as_str()) else {
                bail!("EMA weights have no `{name}`")
            };
            if src.size() != shadow.size() {
                bail!(
                    "EMA weight `{name}` has shape {:?}, the model {:?}",
                    src.size(),
                    shadow.size()
                );
            }
            shadow.copy_(src);
        }
        self.updates = updates;
        Ok(())
    }
}

/// Runs `f` with `weights` (e.g. the EMA's [`Ema::tensors`], on any device) copied into the
/// variables of `vs` they name, then puts the live values back exactly.
pub fn with_weights<R>(vs: &VarStore, weights: &[(String, Tensor)], f: impl FnOnce() -> R) -> R {
    let vars = vs.variables();
    let live: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
        weights
            .iter()
            .filter_map(|(name, w)| {
                let var = vars.get(name)?.shallow_clone();
                let saved = var.detach().copy();
                var.shallow_clone().copy_(w);
                Some((var, saved))
            })
            .collect()
    });
    let out = f();
    tch::no_grad(|| {
        for (mut var, saved) in live {
            var.copy_(&saved);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn the_model_sees_the_ema_weights_inside_with_weights_and_its_own_after() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().randn("w", &[4, 3], 0.0, 1.0);
        let _ = nn::linear(vs.root() / "l", 3, 2, Default::default());
        let mut ema = Ema::new(&vs, 0.5, false);
        let before = w.copy();
        tch::no_grad(|| {
            let _ = w.shallow_clone().g_add_scalar_(1.0);
        });
        ema.update().unwrap(); // shadow = 0.5·before + 0.5·(before + 1)
        let live = w.copy();
        let shadow = ema
            .tensors()
            .into_iter()
            .find(|(n, _)| n == "w")
            .unwrap()
            .1
            .copy();
        assert!(shadow.allclose(&(&before + 0.5), 1e-6, 1e-6, false));
        with_weights(&vs, &ema.tensors(), || {
            assert!(w.equal(&shadow), "the model sees the EMA weights");
        });
        assert!(w.equal(&live), "the live weights come back exactly");
        let (_, _, s) = ema.params.iter().find(|(n, _, _)| n == "w").unwrap();
        assert!(s.equal(&shadow), "and the shadow copy is untouched");
        // Under sharding a rank shadows only what it owns.
        let owned = Ema::sharded(&vs, 0.5, false, |n| n == "w");
        assert_eq!(owned.tensors().len(), 1);
    }
}
