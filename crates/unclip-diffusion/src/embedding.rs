//! Embedding helpers for unCLIP's manipulations (interpolations, text diffs, §SPEC "Image
//! manipulations"): L2 normalisation and spherical interpolation.

use crate::error::{shape_err, Result};
use tch::{Kind, Tensor};

/// x / ‖x‖ along the last dimension (ε-guarded).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?;
    Ok(x / norm.clamp_min(1e-12))
}

/// Mean cosine similarity of matching rows of two [N, D] tensors (computed in f32).
pub fn mean_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = l2_normalize(&a.to_kind(Kind::Float))?;
    let b = l2_normalize(&b.to_kind(Kind::Float))?;
    Ok((a * b)
        .f_sum_dim_intlist(-1, false, Kind::Float)?
        .f_mean(Kind::Float)?
        .double_value(&[]))
}

/// Spherical interpolation between `a` and `b` along the last dimension, θ ∈ [0, 1] a scalar or
/// one per row ([B] or [B, 1]). Vectors need not be unit length: the angle is taken between their
/// directions and norms are interpolated linearly. Falls back to linear interpolation when the
/// vectors are (nearly) parallel.
pub fn slerp(a: &Tensor, b: &Tensor, theta: &Tensor) -> Result<Tensor> {
    if a.size() != b.size() {
        return Err(shape_err(
            "slerp",
            format!("{:?} vs {:?}", a.size(), b.size()),
        ));
    }
    let theta = if theta.dim() == 0 || theta.dim() == a.dim() {
        theta.f_to_kind(a.kind())?
    } else if theta.dim() == 1 && a.dim() >= 1 && theta.size()[0] == a.size()[0] {
        theta.f_to_kind(a.kind())?.f_unsqueeze(-1)?
    } else {
        return Err(shape_err(
            "slerp",
            format!("theta {:?} does not fit {:?}", theta.size(), a.size()),
        ));
    };
    let dims = [-1i64];
    let na = a.f_norm_scalaropt_dim(2.0, dims.as_slice(), true)?;
    let nb = b.f_norm_scalaropt_dim(2.0, dims.as_slice(), true)?;
    let (ua, ub) = (a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12));
    let dot = (&ua * &ub)
        .sum_dim_intlist(dims.as_slice(), true, None::<Kind>)
        .clamp(-1.0, 1.0);
    let omega = dot.acos();
    let sin_omega = omega.sin();
    let parallel = sin_omega.abs().lt(1e-6);
    let safe_sin = sin_omega.where_self(&parallel.logical_not(), &sin_omega.ones_like());
    let wa = (theta.rsub_scalar(1.0) * &omega).sin() / &safe_sin;
    let wb = (&theta * &omega).sin() / &safe_sin;
    let wa = wa.where_self(
        &parallel.logical_not(),
        &theta.rsub_scalar(1.0).expand_as(&wa),
    );
    let wb = wb.where_self(&parallel.logical_not(), &theta.expand_as(&wb));
    let dir = wa * ua + wb * ub;
    let norm = theta.rsub_scalar(1.0) * na + &theta * nb;
    // The slerp of unit vectors is unit except for the parallel fallback; renormalise for both.
    Ok(l2_normalize(&dir)? * norm)
}
