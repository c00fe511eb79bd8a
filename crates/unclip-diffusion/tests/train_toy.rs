//! A real (small) training run through the core: the loss must fall and the trained model's samples
//! must land on the data's modes, far better than the untrained model's.
use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::toy::{train_toy, RingOfGaussians, ToyDenoiser, ToyScore};
use unclip_diffusion::{
    ClipDenoised, DiffusionConfig, GaussianDiffusion, LossType, MeanType, Respacing, SamplerKind,
    VarianceType,
};

fn sample_score(model: &ToyDenoiser, config: &DiffusionConfig, data: &RingOfGaussians) -> ToyScore {
    let d = GaussianDiffusion::respaced(config, &Respacing::from("ddim50")).unwrap();
    let noise = Tensor::randn([2048, 2], (Kind::Float, Device::Cpu));
    let x = d
        .sample(
            SamplerKind::Ddim { eta: 0.0 },
            &ClipDenoised::None,
            noise,
            |x: &Tensor, t: &Tensor| model.forward(x, t),
            None,
        )
        .unwrap();
    data.score(&x)
}

#[test]
fn training_the_toy_denoiser_lowers_the_loss_and_fits_the_data() {
    for (predict, variance, loss) in [
        (
            MeanType::Epsilon,
            VarianceType::LearnedRange,
            LossType::Hybrid,
        ),
        (MeanType::V, VarianceType::FixedSmall, LossType::Mse),
    ] {
        tch::manual_seed(0);
        let config = DiffusionConfig {
            predict,
            variance,
            loss,
            ..Default::default()
        };
        let diffusion = GaussianDiffusion::new(&config).unwrap();
        let data = RingOfGaussians::default();
        let vs = nn::VarStore::new(Device::Cpu);
        let out_dim = if variance == VarianceType::LearnedRange {
            4
        } else {
            2
        };
        let model = ToyDenoiser::new(vs.root(), 128, 3, out_dim);
        let untrained = sample_score(&model, &config, &data);
        let losses = train_toy(&vs, &model, &diffusion, &data, 1500, 256, 2e-3).unwrap();
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&losses[..50]), mean(&losses[losses.len() - 100..]));
        assert!(
            last < 0.7 * first,
            "{predict:?}: loss {first:.3} -> {last:.3}"
        );
        let trained = sample_score(&model, &config, &data);
        eprintln!("{predict:?}: {untrained:?} -> {trained:?}, loss {first} -> {last}");
        assert!(
            untrained.near_fraction < 0.3,
            "{predict:?}: untrained {untrained:?}"
        );
        assert!(
            trained.near_fraction > 0.5,
            "{predict:?}: trained {trained:?}"
        );
        assert!(
            trained.mode_share.iter().all(|s| *s > 0.06),
            "{predict:?}: every mode covered: {trained:?}"
        );
    }
}
