//! AdamW (Loshchilov & Hutter 2019, PyTorch's update) whose moments are tensors this struct owns,
//! so they can be checkpointed; tch's built-in optimisers cannot save their state.

use crate::config::TrainConfig;
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{nn::VarStore, Kind, Tensor};

/// One trainable tensor with its AdamW state.
#[derive(Debug)]
struct Param {
    name: String,
    var: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// Weight decay skips biases, norm gains and embeddings: every tensor of rank ≤ 1, and any that is
/// an embedding by name — a parameter called `*embedding` (`positional_embedding`), or the `weight`
/// of a module called `*embedding` (`token_embedding.weight`) or `emb` / `*_emb`. Linear layers
/// that merely mention embeddings (`time_embedding.linear_1`, `embedding_proj`,
/// `proj_to_clip_embeddings`) decay like any other matrix.
pub fn decays(name: &str, var: &Tensor) -> bool {
    if var.dim() <= 1 {
        return false;
    }
    let parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.last().copied().unwrap_or("");
    let module = if parts.len() >= 2 {
        parts[parts.len() - 2]
    } else {
        ""
    };
    let is_embedding = |p: &str| p.ends_with("embedding") || p == "emb" || p.ends_with("_emb");
    !(is_embedding(leaf) || (leaf == "weight" && is_embedding(module)))
}

impl AdamW {
    /// Over every trainable variable of `vs`, in name order.
    pub fn new(vs: &VarStore, cfg: &TrainConfig) -> Self {
        let params = crate::named_variables(vs)
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(name, var)| Param {
                decay: decays(&name, &var),
                exp_avg: var.zeros_like().detach(),
                exp_avg_sq: var.zeros_like().detach(),
                name,
                var,
            })
            .collect();
        Self {
            params,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        }
    }

    /// The optimised variables, in name order (the same order on every rank).
    pub fn variables(&self) -> impl Iterator<Item = &Tensor> {
        self.params.iter().map(|p| &p.var)
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (d, n): (Vec<&Param>, Vec<&Param>) = self.params.iter().partition(|p| p.decay);
        (
            d.iter().map(|p| p.name.as_str()).collect(),
            n.iter().map(|p| p.name.as_str()).collect(),
        )
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// The global L2 norm of all gradients (0 for none): per-tensor norms in the gradients' own
    /// precision, as torch's clip_grad_norm_, and a single read back to the host.
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.var.grad())
            .filter(Tensor::defined)
            .map(|g| g.norm().to_kind(Kind::Double))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    }

    /// Scales gradients so their global norm is at most `max_norm` (as torch's clip_grad_norm_).
    pub fn clip_grad_norm(&mut self, norm: f64, max_norm: f64) {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            self.scale_gradients(coef);
        }
    }

    /// Multiplies every gradient by `factor` in place.
    pub fn scale_gradients(&mut self, factor: f64) {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(factor);
            }
        }
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for p in &mut self.params {
            let g = p.var.grad();
            if !g.defined() {
                continue;
            }
            if p.decay && self.weight_decay > 0.0 {
                let _ = p.var.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            // torch's single-tensor AdamW, in place: two temporaries per parameter.
            let _ = p.exp_avg.lerp_(&g, 1.0 - b1);
            let _ = p
                .exp_avg_sq
                .g_mul_scalar_(b2)
                .addcmul_(&g, &(&g * (1.0 - b2)));
            if lr == 0.0 {
                continue;
            }
            let mut denom = p.exp_avg_sq.sqrt();
            let _ = denom
                .g_div_scalar_(bc2.sqrt())
                .g_add_scalar_(self.eps)
                .g_mul_scalar_(-bc1 / lr);
            // var − (lr / bc1) · exp_avg / denom, as one addcdiv.
            let _ = p.var.addcdiv_(&p.exp_avg, &denom);
        }
    }

    /// SAM's ascent: adds e = ρ·g/‖g‖ to every parameter (‖g‖ the global norm) and returns the
    /// perturbations for [`AdamW::sam_descend`].
    pub fn sam_ascend(&mut self, rho: f64, grad_norm: f64) -> Vec<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        let scale = rho / (grad_norm + 1e-12);
        self.params
            .iter_mut()
            .map(|p| {
                let g = p.var.grad();
                g.defined().then(|| {
                    let e = &g * scale;
                    let _ = p.var.g_add_(&e);
                    e
                })
            })
            .collect()
    }

    /// Takes the SAM perturbation back off, leaving the gradient computed at the perturbed point.
    pub fn sam_descend(&mut self, perturbation: Vec<Option<Tensor>>) {
        let _guard = tch::no_grad_guard();
        for (p, e) in self.params.iter_mut().zip(perturbation) {
            if let Some(e) = e {
                let _ = p.var.g_sub_(&e);
            }
        }
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// Restores the moments and step count; every parameter must be present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            for (prefix, dst) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", p.name);
                let Some(src) = tensors.get(&key) else {
                    bail!("optimizer state has no `{key}`")
                };
                if src.size() != dst.size() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, the model {:?}",
                        src.size(),
                        dst.size()
                    );
                }
                dst.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::decays;
    use tch::{Kind, Tensor};

    #[test]
    fn embeddings_do_not_decay_but_layers_named_after_them_do() {
        let matrix = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu));
        let vector = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        for name in [
            "text_model.embeddings.token_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.embeddings.patch_embedding.weight",
            "positional_embedding",
            "prd_embedding",
            "label_emb.weight",
        ] {
            assert!(!decays(name, &matrix), "{name} should not decay");
        }
        for name in [
            "time_embedding.linear_1.weight",
            "embedding_proj.weight",
            "proj_to_clip_embeddings.weight",
            "transformer_blocks.0.attn1.to_q.weight",
        ] {
            assert!(decays(name, &matrix), "{name} should decay");
        }
        assert!(!decays("layer.bias", &vector));
        assert!(!decays("norm.weight", &vector));
    }
}
