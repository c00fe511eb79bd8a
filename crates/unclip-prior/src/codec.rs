//! The autoregressive prior's view of an image embedding (unCLIP §2.2): z_i reduced by PCA to its
//! first `components` principal components (by eigenvalue), each coordinate — in units of its
//! component's standard deviation — quantised into `buckets` equal-width buckets over ±`range`;
//! and z_i · z_t quantised into `dot_buckets` equal-mass buckets of the training distribution, so
//! bucket j is the j-th quantile band and "condition on a high dot product" is a quantile.
//!
//! Everything is fitted once from training embeddings and kept as untrained variables, so it is
//! saved, resumed and loaded with the model's weights.

use anyhow::{ensure, Result};
use tch::{nn, Kind, Tensor};
use unclip_diffusion::embedding::l2_normalize;

/// The principal components of a set of embeddings, in float64.
#[derive(Debug)]
pub struct PrincipalComponents {
    /// [D]: the mean embedding.
    pub mean: Tensor,
    /// [D]: each component's variance (eigenvalue), largest first.
    pub variances: Tensor,
    /// [D, D]: the components as rows, largest variance first; each one's sign fixed (its largest
    /// coordinate positive), so equal data give equal components.
    pub directions: Tensor,
}

impl PrincipalComponents {
    /// Fits the rows of `z` [N, D], N ≥ 2 (unbiased covariance).
    pub fn fit(z: &Tensor) -> Result<Self> {
        ensure!(
            z.dim() == 2 && z.size()[0] >= 2,
            "principal components: need [N >= 2, D] embeddings, got {:?}",
            z.size()
        );
        let x = z.to_kind(Kind::Double);
        let n = x.size()[0];
        let mean = x.mean_dim(0, false, Kind::Double);
        let centred = &x - &mean;
        let cov = centred.tr().matmul(&centred) / (n - 1) as f64;
        let (values, vectors) = cov.f_linalg_eigh("L")?;
        // eigh sorts ascending: largest first.
        let variances = values.flip([0]).clamp_min(0.0);
        let vectors = vectors.flip([1]).tr();
        let largest = vectors.abs().argmax(1, true);
        let sign = vectors
            .gather(1, &largest, false)
            .ge(0.0)
            .to_kind(Kind::Double)
            * 2.0
            - 1.0;
        Ok(Self {
            mean,
            variances,
            directions: vectors * sign,
        })
    }

    /// `z` [N, D] reconstructed from its first `k` components: mean + its projection on them
    /// (float64).
    pub fn reconstruct(&self, z: &Tensor, k: i64) -> Tensor {
        let v = self.directions.narrow(0, 0, k);
        let centred = z.to_kind(Kind::Double) - &self.mean;
        centred.matmul(&v.tr()).matmul(&v) + &self.mean
    }

    /// The fraction of the variance the first `k` components hold.
    pub fn explained(&self, k: i64) -> f64 {
        let total = self
            .variances
            .sum(Kind::Double)
            .double_value(&[])
            .max(1e-30);
        self.variances
            .narrow(0, 0, k)
            .sum(Kind::Double)
            .double_value(&[])
            / total
    }
}

#[derive(Debug)]
pub struct EmbeddingCodec {
    /// [D]: the mean of the training z_i.
    mean: Tensor,
    /// [K, D]: the principal directions, largest eigenvalue first.
    components: Tensor,
    /// [K]: each component's standard deviation (√eigenvalue).
    scale: Tensor,
    /// [dot_buckets - 1]: the quantiles of the training z_i · z_t between buckets.
    dot_edges: Tensor,
    /// []: the fraction of the training variance the kept components hold.
    explained: Tensor,
    buckets: i64,
    range: f64,
}

impl EmbeddingCodec {
    /// Variables under `p`: `mean`, `components`, `scale`, `dot_edges`, `explained`.
    pub fn new(
        p: nn::Path,
        dim: i64,
        components: i64,
        buckets: i64,
        range: f64,
        dot_buckets: i64,
    ) -> Self {
        Self {
            mean: p.zeros_no_train("mean", &[dim]),
            components: p.zeros_no_train("components", &[components, dim]),
            scale: p.ones_no_train("scale", &[components]),
            dot_edges: p.zeros_no_train("dot_edges", &[dot_buckets - 1]),
            explained: p.zeros_no_train("explained", &[]),
            buckets,
            range,
        }
    }

    /// Variables [`Self::new`] makes.
    pub fn variable_count(dim: i64, components: i64, dot_buckets: i64) -> i64 {
        dim + components * dim + components + (dot_buckets - 1) + 1
    }

    pub fn components(&self) -> i64 {
        self.components.size()[0]
    }

    pub fn buckets(&self) -> i64 {
        self.buckets
    }

    pub fn dot_buckets(&self) -> i64 {
        self.dot_edges.size()[0] + 1
    }

    /// The fraction of the training variance the kept components hold.
    pub fn explained_variance(&self) -> f64 {
        self.explained.double_value(&[])
    }

    /// Fits the PCA and the dot-product quantiles to training pairs `z_i`, `z_t` [N, D] (N must
    /// exceed the components kept). Computed in float64; each direction's sign is fixed (its
    /// largest coordinate positive), so equal data give equal codecs.
    pub fn fit(&mut self, z_i: &Tensor, z_t: &Tensor) -> Result<()> {
        let (d, k) = (self.mean.size()[0], self.components());
        let n = z_i.size()[0];
        ensure!(
            z_i.dim() == 2 && z_i.size()[1] == d && z_t.size() == z_i.size(),
            "codec fit: z_i and z_t must both be [N, {d}], got {:?} and {:?}",
            z_i.size(),
            z_t.size()
        );
        ensure!(
            n > k,
            "codec fit: {n} training embeddings cannot fit {k} principal components (data.stats_samples must exceed the components)"
        );
        let device = self.mean.device();
        let pca = PrincipalComponents::fit(&z_i.to_device(device))?;
        let (mean, values) = (pca.mean, pca.variances);
        let vectors = pca.directions.narrow(0, 0, k);
        let kept = values.narrow(0, 0, k);
        let explained = kept.sum(Kind::Double) / values.sum(Kind::Double).clamp_min(1e-30);
        let dots = cosine(z_i, z_t)?.to_device(device);
        let nd = self.dot_buckets();
        let q = Tensor::arange_start(1, nd, (Kind::Double, device)) / nd as f64;
        let edges = dots.quantile(&q, None, false, "linear");
        tch::no_grad(|| {
            self.mean.copy_(&mean);
            self.components.copy_(&vectors);
            self.scale.copy_(&kept.sqrt().clamp_min(1e-6));
            self.dot_edges.copy_(&edges);
            self.explained.copy_(&explained);
        });
        Ok(())
    }

    /// [N, D] → [N, K] float64: coordinates along the kept components in standard deviations.
    /// In float64, which autocast leaves alone: a bf16 projection would be coarser than a bucket.
    pub fn project(&self, z: &Tensor) -> Tensor {
        let f64 = |t: &Tensor| t.to_kind(Kind::Double);
        (f64(z) - f64(&self.mean)).matmul(&f64(&self.components).tr()) / f64(&self.scale)
    }

    /// [N, K] coordinates → [N, D] float32 embeddings, L2-normalised (the shards' layout).
    pub fn unproject(&self, coords: &Tensor) -> Result<Tensor> {
        let f64 = |t: &Tensor| t.to_kind(Kind::Double);
        let z = (f64(coords) * f64(&self.scale)).matmul(&f64(&self.components)) + f64(&self.mean);
        Ok(l2_normalize(&z)?.to_kind(Kind::Float))
    }

    /// [N, D] → [N, K] int64 tokens in [0, buckets); coordinates beyond ±range clamp to the ends.
    pub fn encode(&self, z: &Tensor) -> Tensor {
        let width = 2.0 * self.range / self.buckets as f64;
        ((self.project(z) + self.range) / width)
            .floor()
            .clamp(0.0, (self.buckets - 1) as f64)
            .to_kind(Kind::Int64)
    }

    /// [N, K] tokens → [N, D]: each bucket's centre, back through the PCA, L2-normalised.
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        let width = 2.0 * self.range / self.buckets as f64;
        let coords = (tokens.to_kind(Kind::Double) + 0.5) * width - self.range;
        self.unproject(&coords)
    }

    /// [N] int64 dot tokens in [0, dot_buckets): the quantile band of cosine(z_i, z_t).
    pub fn dot_token(&self, z_i: &Tensor, z_t: &Tensor) -> Result<Tensor> {
        let dots = cosine(z_i, z_t)?.to_kind(self.dot_edges.kind());
        Ok(dots.bucketize(&self.dot_edges, false, true))
    }

    /// The dot token of the `quantile`-th band of the training z_i · z_t (e.g. 0.9: the top decile).
    pub fn dot_token_at_quantile(&self, quantile: f64) -> i64 {
        let nd = self.dot_buckets();
        ((quantile * nd as f64).floor() as i64).clamp(0, nd - 1)
    }
}

/// Row-wise cosine of two [N, D] batches, in float64 (bands can be narrow).
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = l2_normalize(&a.to_kind(Kind::Double))?;
    let b = l2_normalize(&b.to_kind(Kind::Double))?;
    Ok((a * b).sum_dim_intlist(-1, false, Kind::Double))
}
