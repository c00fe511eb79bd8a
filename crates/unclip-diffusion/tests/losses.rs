//! Forward process moments, VLB terms and the hybrid loss against guided-diffusion's formulas.
mod common;

use common::*;
use tch::{Kind, Tensor};
use unclip_diffusion::gaussian::{discretized_gaussian_log_likelihood, normal_kl};
use unclip_diffusion::{
    BetaSchedule, DiffusionConfig, GaussianDiffusion, LossType, MeanType, TimestepEmphasis,
    VarianceType,
};

fn hybrid_config() -> DiffusionConfig {
    DiffusionConfig {
        schedule: BetaSchedule::Cosine,
        timesteps: 1000,
        predict: MeanType::Epsilon,
        variance: VarianceType::LearnedRange,
        loss: LossType::Hybrid,
        vlb_weight: 1e-3,
        timestep_loss_weights: None,
        timestep_emphasis: None,
        min_snr_gamma: None,
    }
}

#[test]
fn q_sample_has_the_marginal_moments() {
    tch::manual_seed(0);
    let d = GaussianDiffusion::new(&DiffusionConfig::default()).unwrap();
    let n = 200_000;
    let x0 = Tensor::full([n, 1], 0.7, (Kind::Double, tch::Device::Cpu));
    for t in [0i64, 100, 500, 999] {
        let xt = d.q_sample(&x0, &full_t(n, t), &x0.randn_like()).unwrap();
        let ab = d.alphas_cumprod()[t as usize];
        let (mean, std) = (
            xt.mean(Kind::Double).double_value(&[]),
            xt.std(true).double_value(&[]),
        );
        let (want_mean, want_std) = (0.7 * ab.sqrt(), (1.0 - ab).sqrt());
        // 5 standard errors of the estimates.
        assert!(
            (mean - want_mean).abs() < 5.0 * want_std / (n as f64).sqrt() + 1e-12,
            "t={t}: mean {mean} vs {want_mean}"
        );
        assert!(
            (std - want_std).abs() < 5.0 * want_std / (2.0 * n as f64).sqrt() + 1e-9,
            "t={t}: std {std} vs {want_std}"
        );
        let (m, v, lv) = d.q_mean_variance(&x0, &full_t(n, t)).unwrap();
        assert_close(
            &m.mean(Kind::Double),
            &Tensor::from(want_mean),
            1e-12,
            0.0,
            "q mean",
        );
        assert_close(
            &v.mean(Kind::Double),
            &Tensor::from(1.0 - ab),
            1e-12,
            0.0,
            "q var",
        );
        assert_close(
            &lv.mean(Kind::Double),
            &Tensor::from((1.0 - ab).ln()),
            1e-12,
            0.0,
            "q logvar",
        );
    }
}

#[test]
fn vlb_terms_match_guided_diffusion() {
    let f = fixtures("vlb.safetensors");
    let d = GaussianDiffusion::new(&hybrid_config()).unwrap();
    let (x0, xt, t, out) = (
        get(&f, "x0"),
        get(&f, "x_t"),
        get(&f, "t"),
        get(&f, "model_output"),
    );
    let vb = d.vb_terms_bpd(out, x0, xt, t).unwrap();
    assert_close(&vb, get(&f, "vb"), 1e-9, 1e-9, "vb_terms_bpd");
    assert_close(
        &d.prior_bpd(x0).unwrap(),
        get(&f, "prior_bpd"),
        1e-12,
        1e-9,
        "prior_bpd",
    );
    let pmv = d
        .p_mean_variance(out, xt, t, &unclip_diffusion::ClipDenoised::None)
        .unwrap();
    let ll =
        discretized_gaussian_log_likelihood(x0, &pmv.mean, &(&pmv.log_variance * 0.5)).unwrap();
    assert_close(
        &ll,
        get(&f, "disc_ll"),
        1e-9,
        1e-9,
        "discretized log-likelihood",
    );
    let (true_mean, _, true_lv) = d.q_posterior_mean_variance(x0, xt, t).unwrap();
    let kl = normal_kl(&true_mean, &true_lv, &pmv.mean, &pmv.log_variance);
    assert_close(&kl, get(&f, "kl"), 1e-9, 1e-9, "normal_kl");
}

#[test]
fn hybrid_loss_matches_and_stops_the_gradient_of_the_vlb_on_the_mean() {
    let f = fixtures("vlb.safetensors");
    let d = GaussianDiffusion::new(&hybrid_config()).unwrap();
    let (x0, xt, t, noise) = (
        get(&f, "x0"),
        get(&f, "x_t"),
        get(&f, "t"),
        get(&f, "noise"),
    );
    let out = get(&f, "model_output").detach().set_requires_grad(true);
    let losses = d.training_losses(&out, x0, xt, t, noise).unwrap();
    assert_close(&losses.mse, get(&f, "mse"), 1e-12, 1e-12, "mse");
    assert_close(losses.vb.as_ref().unwrap(), get(&f, "vb"), 1e-9, 1e-9, "vb");
    assert_close(&losses.loss, get(&f, "hybrid"), 1e-9, 1e-9, "hybrid loss");
    // Gradient wrt the mean channels comes from the MSE alone: 2(ε̂ − ε)/numel per sample.
    losses.loss.sum(Kind::Double).backward();
    let grad = out.grad();
    let eps_grad = grad.narrow(1, 0, 3);
    let per_sample = (3 * 4 * 4) as f64;
    let want = (out.narrow(1, 0, 3).detach() - noise) * (2.0 / per_sample);
    assert_close(
        &eps_grad,
        &want,
        1e-12,
        1e-9,
        "mean-channel gradient is the MSE's only",
    );
    // The variance channels do get a gradient from the VLB.
    assert!(
        grad.narrow(1, 3, 3)
            .abs()
            .sum(Kind::Double)
            .double_value(&[])
            > 0.0
    );
}

#[test]
fn mse_targets_follow_the_parameterisation_and_timestep_weights_apply() {
    tch::manual_seed(1);
    let opts = (Kind::Double, tch::Device::Cpu);
    let x0 = Tensor::randn([4, 2, 3, 3], opts);
    let noise = Tensor::randn([4, 2, 3, 3], opts);
    let t = Tensor::from_slice(&[0i64, 3, 7, 9]);
    for predict in [MeanType::Epsilon, MeanType::X0, MeanType::V] {
        let cfg = DiffusionConfig {
            schedule: BetaSchedule::Linear,
            timesteps: 100,
            predict,
            ..Default::default()
        };
        let d = GaussianDiffusion::new(&cfg).unwrap();
        let xt = d.q_sample(&x0, &t, &noise).unwrap();
        let target = match predict {
            MeanType::Epsilon => noise.shallow_clone(),
            MeanType::X0 => x0.shallow_clone(),
            MeanType::V => d.v_target(&x0, &t, &noise).unwrap(),
        };
        // The exact target gives zero loss, and from it the other two quantities are recovered.
        let losses = d.training_losses(&target, &x0, &xt, &t, &noise).unwrap();
        assert!(
            losses.loss.abs().max().double_value(&[]) < 1e-20,
            "{predict:?}"
        );
        let (px0, peps) = d.predict_xstart_eps(&target, &xt, &t).unwrap();
        assert_close(&px0, &x0, 1e-9, 1e-9, "x0 from target");
        assert_close(&peps, &noise, 1e-9, 1e-9, "eps from target");
        let off = &target + 0.5;
        let losses = d.training_losses(&off, &x0, &xt, &t, &noise).unwrap();
        assert_close(
            &losses.loss,
            &Tensor::full([4], 0.25, opts),
            1e-12,
            0.0,
            "mse of a 0.5 offset",
        );
        // Per-timestep weights multiply each sample's loss by w[t].
        let w: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let dw = GaussianDiffusion::new(&DiffusionConfig {
            timestep_loss_weights: Some(w),
            ..cfg.clone()
        })
        .unwrap();
        let lw = dw.training_losses(&off, &x0, &xt, &t, &noise).unwrap();
        assert_close(
            &lw.loss,
            &Tensor::from_slice(&[0.0, 0.75, 1.75, 2.25]),
            1e-12,
            0.0,
            "weighted loss",
        );
    }
}

#[test]
fn mismatched_shapes_are_named() {
    let d = GaussianDiffusion::new(&hybrid_config()).unwrap();
    let opts = (Kind::Float, tch::Device::Cpu);
    let x = Tensor::zeros([2, 3, 4, 4], opts);
    let t = full_t(2, 5);
    let err = d
        .training_losses(&Tensor::zeros([2, 3, 4, 4], opts), &x, &x, &t, &x)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("learned_range variance needs [2, 6, 4, 4]"),
        "{err}"
    );
    let err = d.training_losses(
        &Tensor::zeros([2, 6, 4, 4], opts),
        &x,
        &x,
        &t,
        &Tensor::zeros([2, 3, 4, 5], opts),
    );
    assert!(err.unwrap_err().to_string().contains("x_start vs noise"));
    let err = d
        .vb_terms_bpd(&Tensor::zeros([2, 6, 4, 4], opts), &x, &x, &full_t(2, 1000))
        .unwrap_err();
    assert!(
        err.to_string().contains("timestep 1000 out of range"),
        "{err}"
    );
}

/// Min-SNR-γ is one weighting in x_0 terms whatever the network predicts: an output whose implied
/// x_0 is off by δ costs min(SNR(t), γ)·mean(δ²), and the hybrid loss's VLB term stays unweighted.
#[test]
fn min_snr_weights_every_parameterisation_as_capped_snr_in_x0_terms() {
    tch::manual_seed(2);
    let opts = (Kind::Double, tch::Device::Cpu);
    let x0 = Tensor::randn([5, 3, 4, 4], opts);
    let noise = Tensor::randn([5, 3, 4, 4], opts);
    let delta = Tensor::randn([5, 3, 4, 4], opts) * 0.1;
    let steps = [0usize, 50, 300, 700, 999];
    let t = Tensor::from_slice(&steps.map(|i| i as i64));
    let gamma = 5.0;
    // f(ᾱ_t) for each sample's t, shaped [5, 1, 1, 1].
    let per = |ac: &[f64], f: &dyn Fn(f64) -> f64| {
        Tensor::from_slice(&steps.map(|i| f(ac[i]))).reshape([5, 1, 1, 1])
    };
    for predict in [MeanType::Epsilon, MeanType::X0, MeanType::V] {
        let cfg = DiffusionConfig {
            predict,
            min_snr_gamma: Some(gamma),
            ..Default::default()
        };
        let d = GaussianDiffusion::new(&cfg).unwrap();
        let xt = d.q_sample(&x0, &t, &noise).unwrap();
        let x0_hat = &x0 + &delta;
        let ac = d.alphas_cumprod();
        let (sa, s1a) = (per(ac, &|a| a.sqrt()), per(ac, &|a| (1.0 - a).sqrt()));
        let eps_hat = (&xt - &sa * &x0_hat) / &s1a;
        let out = match predict {
            MeanType::Epsilon => eps_hat.shallow_clone(),
            MeanType::X0 => x0_hat.shallow_clone(),
            MeanType::V => &sa * &eps_hat - &s1a * &x0_hat,
        };
        let losses = d.training_losses(&out, &x0, &xt, &t, &noise).unwrap();
        let capped = per(ac, &|a| (a / (1.0 - a)).min(gamma)).reshape([5]);
        let want = delta
            .square()
            .mean_dim(&[1i64, 2, 3][..], false, Kind::Double)
            * capped;
        assert_close(&losses.loss, &want, 1e-8, 1e-10, &format!("{predict:?}"));
        // The unweighted MSE is still reported as such.
        assert!((losses.mse - &losses.loss).abs().max().double_value(&[]) > 1e-6);
    }
    // Hybrid: only L_simple is weighted.
    let cfg = DiffusionConfig {
        min_snr_gamma: Some(gamma),
        ..hybrid_config()
    };
    let d = GaussianDiffusion::new(&cfg).unwrap();
    let xt = d.q_sample(&x0, &t, &noise).unwrap();
    let out = Tensor::cat(&[&noise + &delta, Tensor::zeros([5, 3, 4, 4], opts)], 1);
    let l = d.training_losses(&out, &x0, &xt, &t, &noise).unwrap();
    let w = per(d.alphas_cumprod(), &|a| {
        let snr = a / (1.0 - a);
        snr.min(gamma) / snr
    });
    let want = &l.mse * w.reshape([5]) + l.vb.as_ref().unwrap() * 1.0;
    assert_close(&l.loss, &want, 1e-10, 1e-12, "hybrid with min-SNR");
    // γ must be positive.
    let bad = DiffusionConfig {
        min_snr_gamma: Some(0.0),
        ..Default::default()
    };
    let err = GaussianDiffusion::new(&bad).unwrap_err().to_string();
    assert!(err.contains("diffusion.min_snr_gamma"), "{err}");
}

#[test]
fn timestep_emphasis_weights_the_middle_steps_and_keeps_a_floor() {
    let e = TimestepEmphasis {
        centre: 0.45,
        width: 0.2,
        floor: 0.15,
    };
    let w = e.weights(1000);
    assert_eq!(w.len(), 1000);
    let mean = w.iter().sum::<f64>() / 1000.0;
    assert!((mean - 1.0).abs() < 1e-12, "mean {mean}");
    let peak = (0..1000).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap();
    assert_eq!(peak, 450);
    // Symmetric about the centre; the ends sit just above the floor, relative to the peak.
    assert!((w[350] - w[550]).abs() < 1e-12);
    let rel_end = |t: usize, dist: f64| {
        let want = 0.15 + 0.85 * (-0.5f64 * (dist / 0.2).powi(2)).exp();
        assert!(
            (w[t] / w[450] - want).abs() < 1e-12,
            "t {t}: {}",
            w[t] / w[450]
        );
    };
    rel_end(0, 0.45);
    rel_end(999, 0.549);
    assert!(w[999] / w[450] > 0.15 && w[999] / w[450] < 0.2);
    // A floor of 1 is uniform.
    let flat = TimestepEmphasis { floor: 1.0, ..e }.weights(1000);
    assert!(flat.iter().all(|x| (x - 1.0).abs() < 1e-12));

    // The loss is weighted exactly as by the same list given as timestep_loss_weights.
    let opts = (Kind::Double, tch::Device::Cpu);
    let x0 = Tensor::randn([4, 3, 4, 4], opts);
    let noise = Tensor::randn([4, 3, 4, 4], opts);
    let t = Tensor::from_slice(&[0i64, 300, 450, 999]);
    let losses = |cfg: &DiffusionConfig| {
        let d = GaussianDiffusion::new(cfg).unwrap();
        let xt = d.q_sample(&x0, &t, &noise).unwrap();
        let out = Tensor::cat(&[&noise + 0.1, Tensor::zeros([4, 3, 4, 4], opts)], 1);
        d.training_losses(&out, &x0, &xt, &t, &noise).unwrap().loss
    };
    let emphasised = losses(&DiffusionConfig {
        timestep_emphasis: Some(e),
        ..hybrid_config()
    });
    let listed = losses(&DiffusionConfig {
        timestep_loss_weights: Some(w.clone()),
        ..hybrid_config()
    });
    let plain = losses(&hybrid_config());
    assert_close(&emphasised, &listed, 1e-12, 0.0, "emphasis = its list");
    let want = &plain * Tensor::from_slice(&[w[0], w[300], w[450], w[999]]);
    assert_close(&emphasised, &want, 1e-12, 1e-15, "per-sample weights");

    // Bad settings name the key.
    for (bad, key) in [
        (
            DiffusionConfig {
                timestep_emphasis: Some(e),
                timestep_loss_weights: Some(w),
                ..hybrid_config()
            },
            "timestep_loss_weights",
        ),
        (
            DiffusionConfig {
                timestep_emphasis: Some(TimestepEmphasis { width: 0.0, ..e }),
                ..hybrid_config()
            },
            "timestep_emphasis.width",
        ),
        (
            DiffusionConfig {
                timestep_emphasis: Some(TimestepEmphasis { floor: 1.5, ..e }),
                ..hybrid_config()
            },
            "timestep_emphasis.floor",
        ),
        (
            DiffusionConfig {
                timestep_emphasis: Some(TimestepEmphasis { centre: -0.1, ..e }),
                ..hybrid_config()
            },
            "timestep_emphasis.centre",
        ),
    ] {
        let err = GaussianDiffusion::new(&bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}
