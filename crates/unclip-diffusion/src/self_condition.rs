//! Self-conditioning (Chen et al. 2022, "Analog Bits"): the denoiser also takes its own latest
//! estimate of x_0 as input. While sampling, each step passes on the x_0 the step before
//! predicted (zeros at the first); in training, half the batches first run the model without
//! gradient to get that estimate and the rest see zeros, so the model learns both uses.

use tch::{Device, Kind, Tensor};

use crate::error::{DiffusionError, Result};
use crate::gaussian::{ClipDenoised, GaussianDiffusion};

/// A self-conditioned model `model(x_t, x0_estimate, t)` as the `model(x_t, t)` a sampler calls.
/// `diffusion` is the training process (samplers pass training timesteps, and its
/// parameterisation reads x_0 from the output); `clip` is applied to each estimate passed on.
/// Compose guidance inside `model`, so that the estimate is the guided one.
pub fn self_conditioned<'a, F, E>(
    diffusion: &'a GaussianDiffusion,
    clip: ClipDenoised,
    mut model: F,
) -> impl FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a
where
    F: FnMut(&Tensor, &Tensor, &Tensor) -> std::result::Result<Tensor, E> + 'a,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut estimate: Option<Tensor> = None;
    move |x: &Tensor, t: &Tensor| {
        let previous = estimate.take().unwrap_or_else(|| x.zeros_like());
        let out = model(x, &previous, t).map_err(|e| DiffusionError::Model(e.into()))?;
        estimate = Some(diffusion.predict_xstart(&out, x, t, &clip)?);
        Ok(out)
    }
}

/// The x_0 estimate a training batch is conditioned on: with probability ½ (drawn from the
/// seeded CPU generator, so resumed runs repeat it) the model's own, from a first pass without
/// gradient on a zero estimate, clipped by `clip`; otherwise zeros.
pub fn training_estimate<F, E>(
    diffusion: &GaussianDiffusion,
    x_t: &Tensor,
    t: &Tensor,
    clip: &ClipDenoised,
    mut model: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor, &Tensor) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let zeros = x_t.zeros_like();
    if Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]) >= 0.5 {
        return Ok(zeros);
    }
    let _guard = tch::no_grad_guard();
    let out = model(x_t, &zeros, t).map_err(|e| DiffusionError::Model(e.into()))?;
    Ok(diffusion
        .predict_xstart(&out, x_t, t, clip)?
        .to_kind(x_t.kind())
        .detach())
}
