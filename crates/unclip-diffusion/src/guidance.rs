//! Classifier-free guidance (Ho & Salimans 2021) as GLIDE runs it: one forward of size 2B
//! (conditional first, null second); guidance on the mean channels, and the learned variance
//! taken from the conditional branch.

use crate::error::{shape_err, DiffusionError, Result};
use tch::Tensor;

/// Combines a [2B, ...] output (conditional rows first) into the guided [B, ...] output.
/// `mean_channels` is how many leading channels (dim 1) carry the mean prediction; the rest, if
/// any, is a learned variance taken from the conditional half.
pub fn guide_output(out_2b: &Tensor, scale: f64, mean_channels: i64) -> Result<Tensor> {
    let size = out_2b.size();
    if size.len() < 2 || size[0] % 2 != 0 {
        return Err(shape_err(
            "guidance",
            format!("output must be [2B, C, ...], got {size:?}"),
        ));
    }
    if mean_channels <= 0 || mean_channels > size[1] {
        return Err(shape_err(
            "guidance",
            format!(
                "mean_channels {mean_channels} does not fit {} output channels",
                size[1]
            ),
        ));
    }
    let halves = out_2b.f_chunk(2, 0)?;
    let (cond, uncond) = (&halves[0], &halves[1]);
    let cond_mean = cond.f_narrow(1, 0, mean_channels)?;
    let uncond_mean = uncond.f_narrow(1, 0, mean_channels)?;
    let guided = &uncond_mean + (&cond_mean - &uncond_mean) * scale;
    if mean_channels == size[1] {
        return Ok(guided);
    }
    let rest = cond.f_narrow(1, mean_channels, size[1] - mean_channels)?;
    Ok(Tensor::f_cat(&[guided, rest], 1)?)
}

/// Wraps a closure evaluated on a doubled batch into a guided denoiser for the samplers.
/// `model_2b(x, t)` receives x and t repeated twice and must condition the first half and use the
/// null condition for the second.
pub fn classifier_free_guidance<F, E>(
    mut model_2b: F,
    scale: f64,
    mean_channels: i64,
) -> impl FnMut(&Tensor, &Tensor) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    move |x: &Tensor, t: &Tensor| {
        let x2 = Tensor::f_cat(&[x, x], 0)?;
        let t2 = Tensor::f_cat(&[t, t], 0)?;
        let out = model_2b(&x2, &t2).map_err(|e| DiffusionError::Model(e.into()))?;
        guide_output(&out, scale, mean_channels)
    }
}

/// Guidance dropout on one conditioning tensor: row i of `keep` [B, ...], or of `other` (one row
/// [1, ...] broadcast, or [B, ...]) where `take_other` [B] bool is true.
pub fn replace_rows(keep: &Tensor, other: &Tensor, take_other: &Tensor) -> Result<Tensor> {
    let mut shape = vec![-1i64];
    shape.resize(keep.dim(), 1);
    Ok(other
        .f_expand_as(keep)?
        .f_where_self(&take_other.f_view(shape.as_slice())?, keep)?)
}
