//! Self-conditioning: while sampling, each model call receives the clipped x_0 that the call
//! before predicted (zeros at the first), read at the training timesteps of a respaced process;
//! in training, about half the batches get the model's own estimate (without gradient), the
//! rest zeros.
use std::cell::RefCell;

use tch::{Kind, Tensor};
use unclip_diffusion::{
    self_conditioned, training_estimate, BetaSchedule, ClipDenoised, DiffusionConfig,
    GaussianDiffusion, MeanType, Respacing, SamplerKind,
};
use unclip_testkit::max_abs_diff;

fn config() -> DiffusionConfig {
    DiffusionConfig {
        schedule: BetaSchedule::Cosine,
        timesteps: 1000,
        predict: MeanType::V,
        ..Default::default()
    }
}

/// A v output that depends on x and t only (ignores the estimate), with x_0 predictions
/// outside [-1, 1] so that clipping shows.
fn v_output(x: &Tensor, t: &Tensor) -> Tensor {
    x * 0.7 + t.to_kind(Kind::Double).view([-1, 1]) * 2e-3 - 0.4
}

#[test]
fn each_sampling_step_sees_the_clipped_x0_of_the_step_before() {
    let training = GaussianDiffusion::new(&config()).unwrap();
    let respaced = GaussianDiffusion::respaced(&config(), &Respacing::from("ddim10")).unwrap();
    let clip = ClipDenoised::Static(1.0);
    // (x, t, estimate received, output) of every call
    let calls: RefCell<Vec<[Tensor; 4]>> = RefCell::new(Vec::new());
    let model = |x: &Tensor, x0: &Tensor, t: &Tensor| -> Result<Tensor, tch::TchError> {
        let out = v_output(x, t);
        calls
            .borrow_mut()
            .push([x.copy(), t.copy(), x0.copy(), out.copy()]);
        Ok(out)
    };
    let noise = Tensor::randn([6, 1], (Kind::Double, tch::Device::Cpu)) * 2.0;
    let kind = SamplerKind::Ddim { eta: 0.0 };
    let ours = respaced
        .sample(
            kind,
            &clip,
            noise.copy(),
            self_conditioned(&training, clip, model),
            None,
        )
        .unwrap();
    let calls = calls.into_inner();
    assert_eq!(calls.len(), 10);
    assert_eq!(calls[0][2].abs().sum(Kind::Double).double_value(&[]), 0.0);
    let ac = training.alphas_cumprod();
    for k in 1..calls.len() {
        let [x, t, _, out] = &calls[k - 1];
        let step = t.int64_value(&[0]);
        assert!(
            step > calls[k][1].int64_value(&[0]),
            "training timesteps descend"
        );
        let ab = ac[step as usize];
        let x0 = (x * ab.sqrt() - out * (1.0 - ab).sqrt()).clamp(-1.0, 1.0);
        assert!(max_abs_diff(&calls[k][2], &x0) < 1e-12, "call {k}");
    }
    assert!(
        calls
            .iter()
            .skip(1)
            .any(|c| max_abs_diff(&c[2], &c[2].clamp(-0.99, 0.99)) > 0.0),
        "some estimates are clipped at ±1"
    );
    // The wrapper changes what the model sees, never the sampler's steps.
    let plain = respaced
        .sample(
            kind,
            &clip,
            noise,
            |x: &Tensor, t: &Tensor| -> Result<Tensor, tch::TchError> { Ok(v_output(x, t)) },
            None,
        )
        .unwrap();
    assert_eq!(max_abs_diff(&ours, &plain), 0.0);
}

#[test]
fn training_sees_its_own_estimate_half_the_time_without_gradient() {
    tch::manual_seed(7);
    let training = GaussianDiffusion::new(&config()).unwrap();
    let clip = ClipDenoised::Static(1.0);
    let w = Tensor::ones([1], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
    let x_t = Tensor::randn([4, 3], (Kind::Double, tch::Device::Cpu)) * 2.0;
    let t = Tensor::from_slice(&[10i64, 300, 600, 990]);
    let ab = Tensor::from_slice(training.alphas_cumprod())
        .index_select(0, &t)
        .view([-1, 1]);
    let out = v_output(&x_t, &t);
    let expected = (&x_t * ab.sqrt() - &out * ab.rsub_scalar(1.0).sqrt()).clamp(-1.0, 1.0);
    let (mut own, mut zeros) = (0, 0);
    for _ in 0..200 {
        let e = training_estimate(
            &training,
            &x_t,
            &t,
            &clip,
            |x: &Tensor, x0: &Tensor, t: &Tensor| -> Result<Tensor, tch::TchError> {
                assert_eq!(x0.abs().sum(Kind::Double).double_value(&[]), 0.0);
                Ok(v_output(x, t) * &w)
            },
        )
        .unwrap();
        assert!(!e.requires_grad());
        if e.abs().sum(Kind::Double).double_value(&[]) == 0.0 {
            zeros += 1;
        } else {
            assert!(max_abs_diff(&e, &expected) < 1e-12);
            own += 1;
        }
    }
    assert!(
        (70..=130).contains(&own),
        "{own} own estimates, {zeros} zeros"
    );
}
