//! A 2-D toy problem that exercises the whole core end to end in seconds on a CPU: a ring of
//! Gaussian modes, a small MLP denoiser conditioned through the shared timestep embedding, a
//! training loop on `training_losses`, and a sample-quality score that needs no learned model.

use crate::error::Result;
use crate::gaussian::GaussianDiffusion;
use crate::nn::{timestep_embedding, TimestepMlp};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Mixture of `modes` isotropic Gaussians (std `std`) evenly spaced on a circle of `radius`.
#[derive(Debug, Clone)]
pub struct RingOfGaussians {
    pub modes: usize,
    pub radius: f64,
    pub std: f64,
}

impl Default for RingOfGaussians {
    fn default() -> Self {
        Self {
            modes: 8,
            radius: 1.0,
            std: 0.05,
        }
    }
}

impl RingOfGaussians {
    /// Mode centres, [modes, 2].
    pub fn centres(&self) -> Tensor {
        let angles = Tensor::arange(self.modes as i64, (Kind::Double, Device::Cpu))
            * (2.0 * std::f64::consts::PI / self.modes as f64);
        Tensor::stack(&[angles.cos(), angles.sin()], 1) * self.radius
    }

    /// `n` samples, [n, 2] in f32 on `device`.
    pub fn sample(&self, n: i64, device: Device) -> Tensor {
        let which = Tensor::randint(self.modes as i64, [n], (Kind::Int64, Device::Cpu));
        let x = self.centres().index_select(0, &which)
            + Tensor::randn([n, 2], (Kind::Double, Device::Cpu)) * self.std;
        x.to_kind(Kind::Float).to_device(device)
    }

    /// How well `samples` match the mixture; needs no learned model.
    pub fn score(&self, samples: &Tensor) -> ToyScore {
        let x = samples.to_kind(Kind::Double).to_device(Device::Cpu);
        let d = (x.unsqueeze(1) - self.centres().unsqueeze(0))
            .square()
            .sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)
            .sqrt();
        let (nearest, idx) = d.min_dim(1, false);
        let n = x.size()[0] as f64;
        let near = nearest
            .le(4.0 * self.std)
            .to_kind(Kind::Double)
            .mean(Kind::Double);
        let share = idx
            .bincount(None::<Tensor>, self.modes as i64)
            .to_kind(Kind::Double)
            / n;
        ToyScore {
            mean_distance: nearest.mean(Kind::Double).double_value(&[]),
            near_fraction: near.double_value(&[]),
            mode_share: Vec::<f64>::try_from(share).unwrap_or_default(),
        }
    }
}

/// Sample quality on [`RingOfGaussians`].
#[derive(Debug, Clone)]
pub struct ToyScore {
    /// Mean distance to the nearest centre (std·√(π/2) for the data itself).
    pub mean_distance: f64,
    /// Fraction of samples within 4 std of a centre (≈ 1 for the data).
    pub near_fraction: f64,
    /// Fraction of samples nearest to each mode (1/modes each for the data).
    pub mode_share: Vec<f64>,
}

/// MLP denoiser for 2-D points: input projection + timestep MLP, residual SiLU layers.
#[derive(Debug)]
pub struct ToyDenoiser {
    input: nn::Linear,
    time: TimestepMlp,
    layers: Vec<nn::Linear>,
    output: nn::Linear,
    time_dim: i64,
}

impl ToyDenoiser {
    /// `out_dim` = 2, or 4 for a learned variance.
    pub fn new(p: nn::Path, hidden: i64, depth: usize, out_dim: i64) -> Self {
        let time_dim = 64;
        Self {
            input: nn::linear(&p / "input", 2, hidden, Default::default()),
            time: TimestepMlp::new(&p / "time_embedding", time_dim, hidden),
            layers: (0..depth)
                .map(|i| nn::linear(&p / "layers" / i, hidden, hidden, Default::default()))
                .collect(),
            output: nn::linear(&p / "output", hidden, out_dim, Default::default()),
            time_dim,
        }
    }

    /// x: [B, 2], t: training timesteps [B].
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let emb = self
            .time
            .forward(&timestep_embedding(t, self.time_dim, 10_000.0)?.to_device(x.device()));
        let mut h = self.input.forward(x) + emb;
        for layer in &self.layers {
            h = &h + layer.forward(&h.silu());
        }
        Ok(self.output.forward(&h.silu()))
    }
}

/// Trains `model` on `data` for `steps` Adam steps; returns the mean loss of every step.
pub fn train_toy(
    vs: &nn::VarStore,
    model: &ToyDenoiser,
    diffusion: &GaussianDiffusion,
    data: &RingOfGaussians,
    steps: usize,
    batch: i64,
    lr: f64,
) -> Result<Vec<f64>> {
    let mut opt = nn::Adam::default().build(vs, lr)?;
    let device = vs.device();
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let x0 = data.sample(batch, device);
        let t = diffusion.sample_timesteps(batch, device);
        let noise = x0.randn_like();
        let xt = diffusion.q_sample(&x0, &t, &noise)?;
        let out = model.forward(&xt, &t)?;
        let loss = diffusion
            .training_losses(&out, &x0, &xt, &t, &noise)?
            .loss
            .mean(Kind::Float);
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    Ok(losses)
}

/// A `size`×`size` scatter plot of 2-D points in [-1.5, 1.5]², as an RGB uint8 tensor [3, H, W]
/// (white background, blue points): what the example saves and the trainer logs.
pub fn scatter_image(points: &Tensor, size: i64) -> Result<Tensor> {
    let pts = points.to_kind(Kind::Float).to_device(Device::Cpu);
    let v: Vec<f32> = Vec::try_from(pts.flatten(0, -1))?;
    let mut rgb = vec![255u8; (3 * size * size) as usize];
    for xy in v.chunks_exact(2) {
        let px = ((xy[0] + 1.5) / 3.0 * size as f32).floor() as i64;
        let py = ((1.5 - xy[1]) / 3.0 * size as f32).floor() as i64;
        if (0..size).contains(&px) && (0..size).contains(&py) {
            for (c, value) in [20u8, 60, 200].into_iter().enumerate() {
                rgb[(c as i64 * size * size + py * size + px) as usize] = value;
            }
        }
    }
    Ok(Tensor::from_slice(&rgb).view([3, size, size]))
}
