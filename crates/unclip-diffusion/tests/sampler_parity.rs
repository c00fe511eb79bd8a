//! One step of each sampler against diffusers' DDPM, DDIM, DPMSolverMultistep and UnCLIP
//! schedulers, for given model outputs and noise. The fixture script hands diffusers the exact
//! float64 schedule, so agreement is to ~1e-9, except DPM-Solver, whose `step` casts the sample
//! to float32 (1e-5).
mod common;

use common::*;
use unclip_diffusion::{
    BetaSchedule, ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType, Respacing,
    VarianceType,
};

fn config(schedule: BetaSchedule, predict: MeanType, variance: VarianceType) -> DiffusionConfig {
    let loss = if variance == VarianceType::LearnedRange {
        LossType::Hybrid
    } else {
        LossType::Mse
    };
    DiffusionConfig {
        schedule,
        timesteps: 1000,
        predict,
        variance,
        loss,
        ..Default::default()
    }
}

const MEAN_TYPES: [(&str, MeanType); 3] = [
    ("epsilon", MeanType::Epsilon),
    ("x0", MeanType::X0),
    ("v", MeanType::V),
];

#[test]
fn ddpm_step_matches_diffusers() {
    let f = fixtures("samplers.safetensors");
    let x = get(&f, "x");
    for (pname, predict) in MEAN_TYPES {
        for (vname, variance) in [
            ("fixed_small", VarianceType::FixedSmall),
            ("fixed_large", VarianceType::FixedLarge),
            ("learned_range", VarianceType::LearnedRange),
        ] {
            let d =
                GaussianDiffusion::new(&config(BetaSchedule::Cosine, predict, variance)).unwrap();
            for (cname, clip) in [
                ("noclip", ClipDenoised::None),
                ("clip", ClipDenoised::Static(1.0)),
            ] {
                for t in [0i64, 1, 500, 999] {
                    let key = format!("ddpm/{pname}/{vname}/{cname}/{t}");
                    let mo = get(&f, &format!("{key}/model_output"));
                    let noise = get(&f, &format!("{key}/noise"));
                    let prev = d.ddpm_step(mo, x, &full_t(3, t), &clip, noise).unwrap();
                    // Unclipped ε-prediction at t = 999 divides by √ᾱ ≈ 6e-3: scale the tolerance.
                    let rtol = 1e-9;
                    assert_close(&prev, get(&f, &format!("{key}/prev")), 1e-9, rtol, &key);
                }
            }
        }
    }
}

#[test]
fn ddim_step_matches_diffusers() {
    let f = fixtures("samplers.safetensors");
    let x = get(&f, "x");
    for (pname, predict) in MEAN_TYPES {
        let cfg = config(BetaSchedule::Linear, predict, VarianceType::FixedSmall);
        let d = GaussianDiffusion::respaced(&cfg, &Respacing::from("ddim50")).unwrap();
        for eta in [0.0, 0.5, 1.0] {
            for (cname, clip) in [
                ("none", ClipDenoised::None),
                ("static", ClipDenoised::Static(1.0)),
                (
                    "dynamic",
                    ClipDenoised::Dynamic {
                        percentile: 0.9,
                        max_value: Some(1.5),
                    },
                ),
            ] {
                for t in [980i64, 780, 0] {
                    let key = format!("ddim/{pname}/{eta:?}/{cname}/{t}");
                    let mo = get(&f, &format!("{key}/model_output"));
                    let noise = get(&f, &format!("{key}/noise"));
                    let idx = d.timestep_map().iter().position(|&k| k == t).unwrap() as i64;
                    let prev = d
                        .ddim_step(mo, x, &full_t(3, idx), eta, &clip, noise)
                        .unwrap();
                    assert_close(&prev, get(&f, &format!("{key}/prev")), 1e-9, 1e-9, &key);
                }
            }
        }
    }
}

#[test]
fn dpm_solver_pp_2m_matches_diffusers() {
    let f = fixtures("samplers.safetensors");
    for (pname, predict) in MEAN_TYPES {
        for schedule in [BetaSchedule::Cosine, BetaSchedule::Linear] {
            let key = format!("dpmpp2m/{pname}/{schedule}");
            let steps: Vec<i64> = Vec::try_from(get(&f, &format!("{key}/timesteps"))).unwrap();
            let kept = Respacing::Explicit(steps.iter().map(|&s| s as usize).collect());
            let d = GaussianDiffusion::respaced(
                &config(schedule, predict, VarianceType::FixedSmall),
                &kept,
            )
            .unwrap();
            let mut x = get(&f, "x").shallow_clone();
            let mut prev_x0 = None;
            for (i, &t) in steps.iter().enumerate() {
                let idx = d.timestep_map().iter().position(|&k| k == t).unwrap();
                let mo = get(&f, &format!("{key}/{i}/model_output"));
                let x0 = d
                    .predict_xstart(mo, &x, &full_t(3, idx as i64), &ClipDenoised::None)
                    .unwrap();
                x = d
                    .dpm_solver_pp_step(&x, idx, &x0, prev_x0.as_ref())
                    .unwrap();
                prev_x0 = Some(x0);
                assert_close(
                    &x,
                    get(&f, &format!("{key}/{i}/x")),
                    1e-5,
                    1e-5,
                    &format!("{key} step {i}"),
                );
            }
        }
    }
}

#[test]
fn unclip_scheduler_step_matches_diffusers() {
    let f = fixtures("samplers.safetensors");
    let x = get(&f, "x");
    for (vname, variance) in [
        ("fixed_small_log", VarianceType::FixedSmall),
        ("learned_range", VarianceType::LearnedRange),
    ] {
        for (pname, predict) in [("epsilon", MeanType::Epsilon), ("x0", MeanType::X0)] {
            let key = format!("unclip/{vname}/{pname}");
            let steps: Vec<i64> = Vec::try_from(get(&f, &format!("{key}/timesteps"))).unwrap();
            let kept = Respacing::Explicit(steps.iter().map(|&s| s as usize).collect());
            let d = GaussianDiffusion::respaced(
                &config(BetaSchedule::Cosine, predict, variance),
                &kept,
            )
            .unwrap();
            for pos in [0usize, 12, 23] {
                let idx = d
                    .timestep_map()
                    .iter()
                    .position(|&k| k == steps[pos])
                    .unwrap() as i64;
                let mo = get(&f, &format!("{key}/{pos}/model_output"));
                let noise = get(&f, &format!("{key}/{pos}/noise"));
                let prev = d
                    .ddpm_step(mo, x, &full_t(3, idx), &ClipDenoised::Static(1.0), noise)
                    .unwrap();
                assert_close(
                    &prev,
                    get(&f, &format!("{key}/{pos}/prev")),
                    1e-9,
                    1e-9,
                    &format!("{key} at {pos}"),
                );
            }
        }
    }
}
