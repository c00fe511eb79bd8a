//! AdamW (Loshchilov & Hutter 2019) whose moments are tensors this struct owns, so they can be
//! checkpointed (tch's built-in optimisers cannot save their state), updated by PyTorch's fused
//! AdamW kernel; gradient norm, clipping and zeroing by its multi-tensor ops.

use crate::config::TrainConfig;
use crate::multi_tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{nn::VarStore, Tensor};

/// One trainable tensor with its AdamW state (undefined moments for a parameter another rank
/// owns under ZeRO-1 sharding: this rank neither keeps its state nor updates it).
#[derive(Debug)]
struct Param {
    name: String,
    var: Tensor,
    decay: bool,
    owned: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Parameters updated by one fused call: same weight decay, device and dtype (indices into
/// `AdamW::params`).
#[derive(Debug)]
struct Group {
    decay: bool,
    members: Vec<usize>,
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    groups: Vec<Group>,
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
        Self::sharded(vs, cfg, |_| true)
    }

    /// Keeping state for and updating only the trainable variables `owns` names (ZeRO-1: see
    /// [`crate::shard`]); the others' gradients still count in the norm and clipping.
    pub fn sharded(vs: &VarStore, cfg: &TrainConfig, owns: impl Fn(&str) -> bool) -> Self {
        let params: Vec<Param> = crate::named_variables(vs)
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(name, var)| {
                let owned = owns(&name);
                let state = || {
                    if owned {
                        var.zeros_like().detach()
                    } else {
                        Tensor::new()
                    }
                };
                Param {
                    decay: decays(&name, &var),
                    owned,
                    exp_avg: state(),
                    exp_avg_sq: state(),
                    name,
                    var,
                }
            })
            .collect();
        let same_group = |a: &Param, b: &Param| {
            a.decay == b.decay && a.var.device() == b.var.device() && a.var.kind() == b.var.kind()
        };
        let mut groups: Vec<Group> = Vec::new();
        for (i, p) in params.iter().enumerate().filter(|(_, p)| p.owned) {
            match groups
                .iter_mut()
                .find(|g| same_group(&params[g.members[0]], p))
            {
                Some(g) => g.members.push(i),
                None => groups.push(Group {
                    decay: p.decay,
                    members: vec![i],
                }),
            }
        }
        Self {
            params,
            groups,
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

    /// The optimised variables' names, in the order of [`AdamW::variables`].
    pub fn variable_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
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

    /// The gradients that exist (parameters that took part in a backward pass).
    fn gradients(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.var.grad())
            .filter(Tensor::defined)
            .collect()
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        multi_tensor::zero_(&self.gradients())
    }

    /// The global L2 norm of all gradients (0 for none): per-tensor norms in the gradients' own
    /// precision, as torch's clip_grad_norm_, and a single read back to the host.
    pub fn grad_norm(&self) -> Result<f64> {
        multi_tensor::global_norm(&self.gradients())
    }

    /// This rank's part of a global norm over gradients sharded across ranks (ZeRO-2): for every
    /// optimised variable in name order its gradient's L2 norm (0 without one here), then a flag
    /// each (1 where it has one) — one fp32 tensor of 2 · variables, so that a sum over ranks,
    /// where each gradient lives on one rank, is exact.
    pub fn gradient_norm_parts(&self) -> Result<Tensor> {
        let n = self.params.len() as i64;
        let device = self
            .params
            .first()
            .map_or(tch::Device::Cpu, |p| p.var.device());
        let (index, grads): (Vec<i64>, Vec<Tensor>) = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (i as i64, p.var.grad()))
            .filter(|(_, g)| g.defined())
            .unzip();
        let parts = Tensor::zeros([2 * n], (tch::Kind::Float, device));
        if !grads.is_empty() {
            let index = Tensor::from_slice(&index).to_device(device);
            let norms = multi_tensor::norms(&grads)?.to_kind(tch::Kind::Float);
            let _ = parts.narrow(0, 0, n).index_copy_(0, &index, &norms);
            let _ = parts.narrow(0, n, n).index_fill_(0, &index, 1.0);
        }
        Ok(parts)
    }

    /// Scales gradients so their global norm is at most `max_norm` (as torch's clip_grad_norm_).
    pub fn clip_grad_norm(&mut self, norm: f64, max_norm: f64) -> Result<()> {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            self.scale_gradients(coef)?;
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` in place.
    pub fn scale_gradients(&mut self, factor: f64) -> Result<()> {
        multi_tensor::mul_(&self.gradients(), factor)
    }

    /// One AdamW update at learning rate `lr`: torch's fused AdamW, one call per group.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        for group in &self.groups {
            let (mut vars, mut grads, mut exp_avgs, mut exp_avg_sqs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for &i in &group.members {
                let p = &self.params[i];
                let g = p.var.grad();
                if g.defined() {
                    vars.push(&p.var);
                    grads.push(g);
                    exp_avgs.push(&p.exp_avg);
                    exp_avg_sqs.push(&p.exp_avg_sq);
                }
            }
            let hp = multi_tensor::AdamWStep {
                step: self.step,
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                weight_decay: if group.decay { self.weight_decay } else { 0.0 },
                eps: self.eps,
            };
            multi_tensor::fused_adamw(&vars, &grads, &exp_avgs, &exp_avg_sqs, hp)?;
        }
        Ok(())
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

    /// The moments this rank keeps as named tensors, for a checkpoint (all of them unsharded).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in self.params.iter().filter(|p| p.owned) {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// Restores the moments (of the parameters this rank owns) and step count; each must be
    /// present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in self.params.iter_mut().filter(|p| p.owned) {
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
