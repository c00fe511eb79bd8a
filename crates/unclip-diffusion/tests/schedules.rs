//! Schedules, respacing and posterior coefficients against guided-diffusion's formulas (fp64) and
//! diffusers' schedulers (fp32), plus config errors.
mod common;

use common::*;
use tch::{Kind, Tensor};
use unclip_diffusion::{
    space_timesteps, BetaSchedule, DiffusionConfig, DiffusionError, GaussianDiffusion, LossType,
    Respacing, VarianceType,
};

fn config(schedule: BetaSchedule, timesteps: usize) -> DiffusionConfig {
    DiffusionConfig {
        schedule,
        timesteps,
        ..Default::default()
    }
}

#[test]
fn betas_and_posterior_match_guided_diffusion() {
    let f = fixtures("schedules.safetensors");
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        for t in [50usize, 100, 1000, 4000] {
            let key = |k: &str| format!("gd/{schedule}/{t}/{k}");
            let d = GaussianDiffusion::new(&config(schedule, t)).unwrap();
            assert_slice_close(d.betas(), get(&f, &key("betas")), 0.0, 1e-12, &key("betas"));
            assert_slice_close(
                d.alphas_cumprod(),
                get(&f, &key("alphas_cumprod")),
                0.0,
                1e-12,
                &key("ac"),
            );
            // Posterior coefficients: q(x_{t-1}|x_t, x_0) with x_0 = 1, x_t = 0 isolates coef1.
            let n = t as i64;
            let ts = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu));
            let ones = Tensor::ones([n, 1], (Kind::Double, tch::Device::Cpu));
            let (m1, var, logvar) = d
                .q_posterior_mean_variance(&ones, &ones.zeros_like(), &ts)
                .unwrap();
            let (m2, _, _) = d
                .q_posterior_mean_variance(&ones.zeros_like(), &ones, &ts)
                .unwrap();
            assert_close(
                &m1.flatten(0, -1),
                get(&f, &key("posterior_mean_coef1")),
                1e-15,
                1e-10,
                &key("coef1"),
            );
            assert_close(
                &m2.flatten(0, -1),
                get(&f, &key("posterior_mean_coef2")),
                1e-15,
                1e-10,
                &key("coef2"),
            );
            assert_close(
                &var.flatten(0, -1),
                get(&f, &key("posterior_variance")),
                1e-18,
                1e-10,
                &key("pv"),
            );
            assert_close(
                &logvar.flatten(0, -1),
                get(&f, &key("posterior_log_variance_clipped")),
                1e-10,
                1e-10,
                &key("plv"),
            );
        }
    }
}

#[test]
fn betas_match_diffusers_schedulers() {
    let f = fixtures("schedules.safetensors");
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        for t in [100usize, 1000] {
            let d = GaussianDiffusion::new(&config(schedule, t)).unwrap();
            // diffusers computes in float32.
            let key = format!("diffusers/{schedule}/{t}/betas");
            assert_slice_close(d.betas(), get(&f, &key), 1e-7, 1e-5, &key);
            let key = format!("diffusers/{schedule}/{t}/alphas_cumprod");
            assert_slice_close(d.alphas_cumprod(), get(&f, &key), 1e-7, 1e-5, &key);
        }
    }
}

#[test]
fn respacing_matches_guided_diffusion() {
    let f = fixtures("schedules.safetensors");
    let cases = [
        (BetaSchedule::Cosine, 1000, "64"),
        (BetaSchedule::Cosine, 1000, "ddim27"),
        (BetaSchedule::Linear, 1000, "ddim15"),
        (BetaSchedule::Linear, 1000, "10,15,20"),
        (BetaSchedule::Cosine, 4000, "250"),
        (BetaSchedule::Linear, 4000, "ddim50"),
        (BetaSchedule::Cosine, 1000, "1000"),
        (BetaSchedule::Linear, 100, "7,3"),
    ];
    for (schedule, t, spec) in cases {
        let key = format!("respace/{schedule}/{t}/{spec}");
        let kept: Vec<i64> = Vec::try_from(get(&f, &format!("{key}/kept"))).unwrap();
        let d = GaussianDiffusion::respaced(&config(schedule, t), &Respacing::from(spec)).unwrap();
        assert_eq!(d.timestep_map(), kept.as_slice(), "{key}: kept steps");
        assert_slice_close(
            d.betas(),
            get(&f, &format!("{key}/betas")),
            1e-15,
            1e-10,
            &key,
        );
        // Marginals at kept steps are those of the full process.
        let full = GaussianDiffusion::new(&config(schedule, t)).unwrap();
        for (i, &k) in kept.iter().enumerate() {
            let (a, b) = (d.alphas_cumprod()[i], full.alphas_cumprod()[k as usize]);
            assert!((a - b).abs() <= 1e-9 * b, "{key}: alphas_cumprod at {k}");
        }
    }
    // An explicit list behaves like the same steps given any other way.
    let explicit = Respacing::Explicit(vec![0, 250, 500, 750, 999]);
    let d = GaussianDiffusion::respaced(&config(BetaSchedule::Cosine, 1000), &explicit).unwrap();
    assert_eq!(d.timestep_map(), &[0, 250, 500, 750, 999]);
    assert_eq!(d.num_timesteps(), 5);
    let yaml: Respacing = serde_yaml::from_str("[0, 500, 999]").unwrap();
    assert_eq!(yaml, Respacing::Explicit(vec![0, 500, 999]));
    let yaml: Respacing = serde_yaml::from_str("ddim27").unwrap();
    assert_eq!(yaml.timesteps(1000).unwrap().len(), 27);
}

#[test]
fn bad_schedules_and_respacings_are_named_errors() {
    let err =
        serde_yaml::from_str::<DiffusionConfig>("schedule: sigmoid\ntimesteps: 10\n").unwrap_err();
    assert!(
        err.to_string().contains("unknown noise schedule `sigmoid`"),
        "{err}"
    );
    let err =
        serde_yaml::from_str::<DiffusionConfig>("schedule: cosine\ntimestep: 10\n").unwrap_err();
    assert!(
        err.to_string().contains("unknown field `timestep`"),
        "{err}"
    );
    let cfg: DiffusionConfig =
        serde_yaml::from_str("schedule: linear\ntimesteps: 100\npredict: v\n").unwrap();
    assert_eq!(cfg.timesteps, 100);

    for spec in ["ddim7000", "abc", "ddim", "2000", "0"] {
        let err = space_timesteps(1000, spec).unwrap_err();
        assert!(
            matches!(err, DiffusionError::InvalidRespacing { .. }),
            "{spec}: {err}"
        );
        assert!(err.to_string().contains(spec), "{spec}: {err}");
    }
    let err = Respacing::Explicit(vec![5, 1000])
        .timesteps(1000)
        .unwrap_err();
    assert!(err.to_string().contains("1000 is out of range"), "{err}");
    assert!(Respacing::Explicit(vec![]).timesteps(10).is_err());
    assert!(Respacing::Explicit(vec![3, 3]).timesteps(10).is_err());

    let mut cfg = DiffusionConfig {
        variance: VarianceType::LearnedRange,
        ..Default::default()
    };
    let err = GaussianDiffusion::new(&cfg).unwrap_err();
    assert!(
        err.to_string().contains("needs diffusion.loss `hybrid`"),
        "{err}"
    );
    cfg.loss = LossType::Hybrid;
    assert!(GaussianDiffusion::new(&cfg).is_ok());
    cfg.timestep_loss_weights = Some(vec![1.0; 3]);
    let err = GaussianDiffusion::new(&cfg).unwrap_err();
    assert!(
        err.to_string()
            .contains("timestep_loss_weights has 3 entries"),
        "{err}"
    );
    let err = GaussianDiffusion::new(&DiffusionConfig {
        timesteps: 0,
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("timesteps"), "{err}");
    let err = GaussianDiffusion::new(&config(BetaSchedule::Linear, 20)).unwrap_err();
    assert!(err.to_string().contains("more than 20 timesteps"), "{err}");
}

#[test]
fn timesteps_are_checked() {
    let d = GaussianDiffusion::new(&config(BetaSchedule::Cosine, 100)).unwrap();
    let x = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
    let noise = x.randn_like();
    let err = d
        .q_sample(&x, &Tensor::from_slice(&[0i64, 100]), &noise)
        .unwrap_err();
    assert!(
        matches!(
            err,
            DiffusionError::TimestepOutOfRange {
                value: 100,
                num_timesteps: 100
            }
        ),
        "{err}"
    );
    let err = d
        .q_sample(&x, &Tensor::from_slice(&[-1i64, 3]), &noise)
        .unwrap_err();
    assert!(
        err.to_string().contains("timestep -1 out of range"),
        "{err}"
    );
    let err = d
        .q_sample(&x, &Tensor::from_slice(&[1i64, 2, 3]), &noise)
        .unwrap_err();
    assert!(
        err.to_string().contains("t must have shape [B] = [2]"),
        "{err}"
    );
    let err = d
        .q_sample(&x, &Tensor::from_slice(&[1.0f32, 2.0]), &noise)
        .unwrap_err();
    assert!(err.to_string().contains("int64"), "{err}");
    let err = d
        .q_sample(
            &x,
            &full_t(2, 5),
            &Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu)),
        )
        .unwrap_err();
    assert!(err.to_string().contains("q_sample noise"), "{err}");
}

#[test]
fn sampler_configs_parse_and_validate() {
    use unclip_diffusion::{ClipDenoised, SamplerConfig, SamplerKind};
    let diffusion = DiffusionConfig::default();
    let cfg: SamplerConfig =
        serde_yaml::from_str("sampler: ddim\nsteps: ddim27\neta: 0.5\nclip: {static: 1.0}\n")
            .unwrap();
    let (d, kind) = cfg.build(&diffusion).unwrap();
    assert_eq!(kind, SamplerKind::Ddim { eta: 0.5 });
    assert_eq!(d.num_timesteps(), 27);
    assert_eq!(cfg.clip, ClipDenoised::Static(1.0));
    let cfg: SamplerConfig = serde_yaml::from_str(
        "sampler: dpmpp_2m\nsteps: [0, 500, 999]\nclip: {dynamic: {percentile: 0.99}}\n",
    )
    .unwrap();
    let (d, kind) = cfg.build(&diffusion).unwrap();
    assert_eq!(
        (kind, d.timestep_map()),
        (SamplerKind::DpmSolverPp2M, &[0i64, 500, 999][..])
    );
    assert_eq!(
        cfg.clip,
        ClipDenoised::Dynamic {
            percentile: 0.99,
            max_value: None
        }
    );
    let cfg: SamplerConfig = serde_yaml::from_str("sampler: ddpm\nsteps: '64'\n").unwrap();
    assert_eq!(cfg.build(&diffusion).unwrap().1, SamplerKind::Ddpm);

    let cfg: SamplerConfig =
        serde_yaml::from_str("sampler: ddpm\nsteps: '64'\nclip: none\n").unwrap();
    assert_eq!(cfg.clip, ClipDenoised::None);
    let round = serde_yaml::to_string(&cfg).unwrap();
    assert_eq!(serde_yaml::from_str::<SamplerConfig>(&round).unwrap(), cfg);
    let err =
        serde_yaml::from_str::<SamplerConfig>("sampler: ddpm\nsteps: '64'\nclip: {statik: 1}\n")
            .unwrap_err();
    assert!(err.to_string().contains("clip: none, {static: R}"), "{err}");
    let err = serde_yaml::from_str::<SamplerConfig>("sampler: ddpm\nsteps: '64'\nclip: always\n")
        .unwrap_err();
    assert!(err.to_string().contains("unknown clip `always`"), "{err}");
    let err = serde_yaml::from_str::<SamplerConfig>("sampler: euler\nsteps: '64'\n").unwrap_err();
    assert!(err.to_string().contains("unknown variant `euler`"), "{err}");
    let cfg: SamplerConfig =
        serde_yaml::from_str("sampler: ddpm\nsteps: '64'\neta: 1.0\n").unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("eta applies to ddim only"));
    let cfg: SamplerConfig =
        serde_yaml::from_str("sampler: ddim\nsteps: '64'\neta: -1.0\n").unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("sampling.eta must be >= 0"));
    let cfg: SamplerConfig =
        serde_yaml::from_str("sampler: ddim\nsteps: '64'\nclip: {dynamic: {percentile: 1.5}}\n")
            .unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("percentile"));
    let cfg: SamplerConfig = serde_yaml::from_str("sampler: ddim\nsteps: ddim9999\n").unwrap();
    assert!(cfg
        .build(&diffusion)
        .unwrap_err()
        .to_string()
        .contains("ddim9999"));
}
