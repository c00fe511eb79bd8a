//! Noise schedules (Ho et al. 2020 linear, Nichol & Dhariwal 2021 cosine) and respacing
//! (guided-diffusion `respace.py`): betas are recomputed from the kept alphas_cumprod.

use crate::error::{DiffusionError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Which beta schedule a diffusion uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String", into = "String")]
pub enum BetaSchedule {
    /// Linear betas from 1e-4 to 0.02, scaled by 1000/T so any T matches the T = 1000 process
    /// (improved DDPM).
    Linear,
    /// alpha_bar(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, betas clipped at 0.999.
    Cosine,
}

impl FromStr for BetaSchedule {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(DiffusionError::UnknownSchedule(other.to_string())),
        }
    }
}

impl TryFrom<String> for BetaSchedule {
    type Error = DiffusionError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<BetaSchedule> for String {
    fn from(s: BetaSchedule) -> String {
        s.to_string()
    }
}

impl fmt::Display for BetaSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        })
    }
}

impl BetaSchedule {
    /// The betas of this schedule for `num_timesteps` steps, in f64.
    pub fn betas(self, num_timesteps: usize) -> Result<Vec<f64>> {
        if num_timesteps == 0 {
            return Err(DiffusionError::InvalidConfig(
                "timesteps must be at least 1".into(),
            ));
        }
        let n = num_timesteps;
        Ok(match self {
            Self::Linear => {
                let scale = 1000.0 / n as f64;
                let (start, end) = (scale * 1e-4, scale * 0.02);
                if end >= 1.0 {
                    return Err(DiffusionError::InvalidConfig(format!(
                        "the linear schedule scales β_T = 0.02·1000/T, which reaches 1 for \
                         timesteps = {n}: use more than 20 timesteps"
                    )));
                }
                // np.linspace: start + i * step, with the last point exactly `end`.
                if n == 1 {
                    vec![start]
                } else {
                    let step = (end - start) / (n - 1) as f64;
                    (0..n)
                        .map(|i| {
                            if i == n - 1 {
                                end
                            } else {
                                start + i as f64 * step
                            }
                        })
                        .collect()
                }
            }
            Self::Cosine => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        })
    }
}

/// Which of the training timesteps a sampler visits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Respacing {
    /// `"64"`, `"ddim27"` or guided-diffusion section counts `"10,15,20"`.
    Spec(String),
    /// The kept timesteps themselves, e.g. `[0, 250, 500, 750, 999]`.
    Explicit(Vec<usize>),
}

impl Respacing {
    /// The sorted set of kept timesteps out of `num_timesteps`.
    pub fn timesteps(&self, num_timesteps: usize) -> Result<Vec<usize>> {
        match self {
            Self::Spec(spec) => space_timesteps(num_timesteps, spec),
            Self::Explicit(steps) => {
                let set: BTreeSet<usize> = steps.iter().copied().collect();
                let bad = |reason: String| DiffusionError::InvalidRespacing {
                    spec: format!("{steps:?}"),
                    reason,
                };
                if set.is_empty() {
                    return Err(bad("the list of kept timesteps is empty".into()));
                }
                if set.len() != steps.len() {
                    return Err(bad("the list repeats a timestep".into()));
                }
                if let Some(&last) = set.iter().next_back() {
                    if last >= num_timesteps {
                        return Err(bad(format!(
                            "timestep {last} is out of range for {num_timesteps} training steps"
                        )));
                    }
                }
                Ok(set.into_iter().collect())
            }
        }
    }
}

impl From<&str> for Respacing {
    fn from(s: &str) -> Self {
        Self::Spec(s.to_string())
    }
}

/// guided-diffusion's `space_timesteps`: `"ddimN"` takes the integer stride giving exactly N
/// steps; otherwise comma-separated counts split T into equal sections, each sampled at evenly
/// spaced (rounded half-to-even, as Python does) positions.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>> {
    let bad = |reason: String| DiffusionError::InvalidRespacing {
        spec: spec.to_string(),
        reason,
    };
    let spec_trim = spec.trim();
    if let Some(count) = spec_trim.strip_prefix("ddim") {
        let desired: usize = count
            .parse()
            .map_err(|_| bad(format!("`{count}` is not a step count")))?;
        for stride in 1..num_timesteps.max(2) {
            if num_timesteps.div_ceil(stride) == desired {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        return Err(bad(format!(
            "no integer stride gives exactly {desired} of {num_timesteps} steps"
        )));
    }
    let counts = spec_trim
        .split(',')
        .map(|c| {
            c.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{c}` is not a step count")))
        })
        .collect::<Result<Vec<_>>>()?;
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut steps = BTreeSet::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if count == 0 || size < count {
            return Err(bad(format!(
                "cannot take {count} steps from a section of {size}"
            )));
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.insert(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    Ok(steps.into_iter().collect())
}

/// Betas of the process that visits only `kept` (sorted) of the original steps, derived from the
/// original alphas_cumprod so the marginals q(x_t | x_0) at kept steps are unchanged.
pub fn respaced_betas(alphas_cumprod: &[f64], kept: &[usize]) -> Vec<f64> {
    let mut last = 1.0;
    kept.iter()
        .map(|&t| {
            let ac = alphas_cumprod[t];
            let beta = 1.0 - ac / last;
            last = ac;
            beta
        })
        .collect()
}

/// Cumulative product of (1 - beta).
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}
