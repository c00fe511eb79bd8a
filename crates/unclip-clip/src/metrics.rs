//! Metrics on sets of CLIP embeddings that `evaluate` and `train-prior` share.

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Neighbours that set each sample's radius in [`precision_recall`]: prdc's recommended k.
pub const NEAREST_K: usize = 5;

/// How generated samples cover the real ones, from k-nearest-neighbour balls (Euclidean) around
/// each sample: precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem
/// et al. 2020), as the `prdc` package computes them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Manifold {
    /// Fake samples inside some real sample's ball: fidelity.
    pub precision: f64,
    /// Real samples inside some fake sample's ball: diversity.
    pub recall: f64,
    /// Real balls each fake sample falls in, over k (can exceed 1).
    pub density: f64,
    /// Real samples whose ball holds some fake sample.
    pub coverage: f64,
}

/// [`Manifold`] of `fake` [M, D] against `real` [N, D] with balls reaching each sample's `k`-th
/// nearest neighbour in its own set; None unless both sets have more than `k` rows.
pub fn precision_recall(real: &Tensor, fake: &Tensor, k: usize) -> Result<Option<Manifold>> {
    let (real, fake) = (
        real.to_device(Device::Cpu).to_kind(Kind::Double),
        fake.to_device(Device::Cpu).to_kind(Kind::Double),
    );
    let k = k as i64;
    if real.size()[0] <= k || fake.size()[0] <= k {
        return Ok(None);
    }
    // The (k+1)-th smallest distance from a sample to its own set: the k-th neighbour past itself.
    let radii = |x: &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_cdist(x, x, 2.0, None::<i64>)?
            .f_kthvalue(k + 1, 1, false)?
            .0)
    };
    let (r_real, r_fake) = (radii(&real)?, radii(&fake)?);
    let d = Tensor::f_cdist(&real, &fake, 2.0, None::<i64>)?; // [N, M]
    let in_real = d.lt_tensor(&r_real.unsqueeze(1)); // fake j inside real i's ball
    let in_fake = d.lt_tensor(&r_fake.unsqueeze(0)); // real i inside fake j's ball
    let mean = |b: &Tensor| b.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    Ok(Some(Manifold {
        precision: mean(&in_real.any_dim(0, false)),
        recall: mean(&in_fake.any_dim(1, false)),
        density: mean(
            &in_real
                .to_kind(Kind::Double)
                .sum_dim_intlist(0, false, Kind::Double),
        ) / k as f64,
        coverage: mean(&d.min_dim(1, false).0.lt_tensor(&r_real)),
    }))
}
