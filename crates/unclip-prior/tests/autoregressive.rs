//! The autoregressive prior against references from scripts/fixtures/ar_prior.py: the codec's PCA,
//! quantiles and round trip against numpy, the model's teacher-forced logits against the same
//! network built from PyTorch's `TransformerEncoderLayer`s; then what only the Rust side has —
//! decoding through the KV caches picks exactly what the full forward would.
use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};
use unclip_prior::codec::PrincipalComponents;
use unclip_prior::{ArPriorConfig, AutoregressivePrior, EmbeddingCodec, TextCondition};
use unclip_testkit::max_abs_diff;

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ar_prior.safetensors");
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

const D: i64 = 12;

fn config(text_layers: i64) -> ArPriorConfig {
    ArPriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 2,
        text_layers,
        text_width: (text_layers > 0).then_some(24),
        embedding_dim: D,
        num_embeddings: 7,
        components: 5,
        buckets: 16,
        range: 3.0,
        dot_buckets: 4,
        dot_quantile: Some(0.9),
        temperature: 1.0,
    }
}

/// The PCA probe's reconstruction from the first k components (the codec's PCA, above, matches
/// numpy): all D components give z back, the residual of k is orthogonal to those k and shrinks
/// as k grows, and the explained variance is the codec's at its 5 components and 1 at D.
#[test]
fn principal_components_reconstruct_from_the_first_k() {
    let f = fixtures();
    let z = f["codec/z_i"].to_kind(Kind::Double);
    let pca = PrincipalComponents::fit(&z).unwrap();
    let dirs = &pca.directions;
    assert!(
        max_abs_diff(
            &dirs.matmul(&dirs.tr()),
            &Tensor::eye(D, (Kind::Double, Device::Cpu))
        ) < 1e-10
    );
    assert!(max_abs_diff(&pca.reconstruct(&z, D), &z) < 1e-10);
    let mut previous = f64::INFINITY;
    for k in 1..D {
        let residual = &z - pca.reconstruct(&z, k);
        let along_kept = residual.matmul(&dirs.narrow(0, 0, k).tr());
        assert!(along_kept.abs().max().double_value(&[]) < 1e-10, "k = {k}");
        let size = residual.square().sum(Kind::Double).double_value(&[]);
        assert!(
            size <= previous + 1e-12,
            "k = {k}: residual {size} grew from {previous}"
        );
        previous = size;
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let mut codec = EmbeddingCodec::new(vs.root() / "codec", D, 5, 16, 3.0, 4);
    codec.fit(&f["codec/z_i"], &f["codec/z_t"]).unwrap();
    // (The codec keeps it as a float32 variable.)
    assert!((pca.explained(5) - codec.explained_variance()).abs() < 1e-6);
    assert!((pca.explained(D) - 1.0).abs() < 1e-12);
}

#[test]
fn codec_fit_encode_and_decode_match_numpy() {
    let f = fixtures();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut codec = EmbeddingCodec::new(vs.root() / "codec", D, 5, 16, 3.0, 4);
    vs.double();
    codec.fit(&f["codec/z_i"], &f["codec/z_t"]).unwrap();
    let vars = vs.variables();
    for part in ["mean", "components", "scale", "dot_edges", "explained"] {
        let ours = &vars[&format!("codec.{part}")];
        // numpy's scalars come as [1]; ours are [].
        let d = max_abs_diff(ours, &f[&format!("codec/{part}")].reshape_as(ours));
        assert!(d < 1e-9, "codec {part} differs from numpy by {d}");
    }
    assert!(codec.explained_variance() > 0.9 && codec.explained_variance() < 1.0);
    let codes = codec.encode(&f["codec/held"]);
    assert!(codes.equal(&f["codec/held_codes"]), "{codes}");
    let back = codec.decode(&codes).unwrap();
    assert!(max_abs_diff(&back, &f["codec/held_decoded"]) < 1e-6);
    let dots = codec
        .dot_token(&f["codec/held"], &f["codec/held_z_t"])
        .unwrap();
    assert!(dots.equal(&f["codec/held_dot_tokens"]), "{dots}");
    // Equal-mass bands: the training dot products fill every band equally.
    let train = codec.dot_token(&f["codec/z_i"], &f["codec/z_t"]).unwrap();
    let counts = train.bincount::<Tensor>(None, 4);
    assert_eq!(Vec::<i64>::try_from(&counts).unwrap(), vec![100; 4]);
    assert_eq!(codec.dot_token_at_quantile(0.0), 0);
    assert_eq!(codec.dot_token_at_quantile(0.9), 3);
    assert_eq!(codec.dot_token_at_quantile(1.0), 3);
}

#[test]
fn codec_round_trip_is_within_half_a_bucket_and_fitting_is_order_free() {
    tch::manual_seed(0);
    let z = unclip_diffusion::l2_normalize(&Tensor::randn([500, 8], (Kind::Double, Device::Cpu)))
        .unwrap();
    let fit = |rows: &Tensor| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut codec = EmbeddingCodec::new(vs.root(), 8, 8, 4096, 4.0, 8);
        vs.double();
        let z_t = z.roll([1], [0]);
        codec
            .fit(&z.index_select(0, rows), &z_t.index_select(0, rows))
            .unwrap();
        (vs, codec)
    };
    let (vs, codec) = fit(&Tensor::arange(500, (Kind::Int64, Device::Cpu)));
    // All components kept: the coordinates come back within half a bucket (8 σ / 4096 / 2).
    let coords = codec.project(&z);
    let width = 8.0 / 4096.0;
    let back = codec.project(&codec.decode(&codec.encode(&z)).unwrap());
    // decode normalises; undo its (tiny) rescaling by comparing before normalisation instead.
    let centres = (codec.encode(&z).to_kind(Kind::Double) + 0.5) * width - 4.0;
    assert!(max_abs_diff(&centres, &coords) <= width / 2.0 + 1e-12);
    assert!(max_abs_diff(&back, &coords) < 0.05);
    let cos =
        (codec.decode(&codec.encode(&z)).unwrap() * &z).sum_dim_intlist(-1, false, Kind::Double);
    assert!(cos.min().double_value(&[]) > 0.9999);
    // bf16 autocast (the trainers' and the pipeline's) leaves the codes and the decoding as
    // they are: the codec computes in float64.
    let z32 = z.to_kind(Kind::Float);
    let (codes, decoded) = (
        codec.encode(&z32),
        codec.decode(&codec.encode(&z32)).unwrap(),
    );
    {
        let _bf16 = unclip_train::precision::autocast(
            Device::Cpu,
            unclip_train::precision::Precision::Bf16,
        );
        assert!(codec.encode(&z32).equal(&codes));
        assert!(codec.decode(&codes).unwrap().equal(&decoded));
    }
    // Shuffled rows fit the same codec (signs fixed, not left to the eigensolver).
    let (vs2, _) = fit(&Tensor::randperm(500, (Kind::Int64, Device::Cpu)));
    let (a, b) = (vs.variables(), vs2.variables());
    for (name, t) in &a {
        assert!(max_abs_diff(t, &b[name]) < 1e-9, "{name}");
    }
    // Too few samples for the components asked is an error that says so.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut codec = EmbeddingCodec::new(vs.root(), 8, 8, 16, 4.0, 8);
    vs.double();
    let err = codec
        .fit(&z.narrow(0, 0, 8), &z.narrow(0, 0, 8))
        .unwrap_err();
    assert!(err.to_string().contains("stats_samples"), "{err}");
}

fn load_model(
    name: &str,
    text_layers: i64,
) -> (nn::VarStore, AutoregressivePrior, HashMap<String, Tensor>) {
    let f = fixtures();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = AutoregressivePrior::new(vs.root(), &config(text_layers)).unwrap();
    vs.double();
    let prefix = format!("{name}/w/");
    let mut theirs: Vec<String> = f
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    let mut ours: Vec<String> = vs
        .variables()
        .into_keys()
        .filter(|k| !k.starts_with("codec."))
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "{name}: parameter names");
    tch::no_grad(|| {
        for (n, mut v) in vs.variables() {
            if let Some(t) = f.get(&format!("{prefix}{n}")) {
                v.copy_(t);
            }
        }
    });
    (vs, model, f)
}

fn text(f: &HashMap<String, Tensor>, name: &str) -> TextCondition {
    TextCondition {
        text_embeds: f[&format!("{name}/z_t")].shallow_clone(),
        tokens: f[&format!("{name}/tokens")].shallow_clone(),
        mask: f[&format!("{name}/mask")].to_kind(Kind::Bool),
    }
}

fn check_parity(name: &str, text_layers: i64) {
    let (_vs, model, f) = load_model(name, text_layers);
    let t = text(&f, name);
    let (dot_logits, logits) = model
        .forward(&t, &f[&format!("{name}/dot")], &f[&format!("{name}/codes")])
        .unwrap();
    let d = max_abs_diff(&logits, &f[&format!("{name}/logits")]);
    assert!(d < 1e-9, "{name}: logits differ from PyTorch's by {d}");
    let d = max_abs_diff(&dot_logits, &f[&format!("{name}/dot_logits")]);
    assert!(d < 1e-9, "{name}: dot logits differ from PyTorch's by {d}");
    // Features behind the caption mask are ignored.
    let noisy = TextCondition {
        tokens: &t.tokens
            + Tensor::randn_like(&t.tokens)
                * t.mask.logical_not().unsqueeze(-1).to_kind(Kind::Double),
        ..t.index_select(&Tensor::arange(4, (Kind::Int64, Device::Cpu)))
            .unwrap()
    };
    let (_, again) = model
        .forward(
            &noisy,
            &f[&format!("{name}/dot")],
            &f[&format!("{name}/codes")],
        )
        .unwrap();
    assert!(
        max_abs_diff(&again, &logits) < 1e-9,
        "{name}: padding leaks"
    );
}

#[test]
fn logits_match_pytorch_transformer_layers_with_projected_captions() {
    check_parity("projected", 0);
}

#[test]
fn logits_match_pytorch_transformer_layers_with_a_caption_encoder() {
    check_parity("encoded", 1);
}

/// At a near-zero temperature sampling is greedy, so each token the KV-cached loop picks — the
/// dot band when drawn, then every code — must be the argmax of the full teacher-forced forward
/// over the tokens picked, guided or not.
#[test]
fn cached_sampling_picks_what_the_full_forward_predicts() {
    for (name, layers) in [("projected", 0), ("encoded", 1)] {
        let (_vs, model, f) = load_model(name, layers);
        let t = text(&f, name);
        let null = t.index_select(&Tensor::from_slice(&[2i64])).unwrap();
        let forced = Tensor::from_slice(&[0i64, 3, 1, 2]);
        for (scale, given) in [(1.0, true), (3.0, true), (1.0, false), (3.0, false)] {
            let (dot, codes) = model
                .sample_codes(&t, given.then_some(&forced), &null, scale, 1e-6)
                .unwrap();
            assert_eq!(codes.size(), [4, 5]);
            if given {
                assert!(dot.equal(&forced));
            }
            let logp = |text: &TextCondition, dot: &Tensor| {
                let (d, c) = model.forward(text, dot, &codes).unwrap();
                (
                    d.log_softmax(-1, Kind::Double),
                    c.log_softmax(-1, Kind::Double),
                )
            };
            let (dc, cc) = logp(&t, &dot);
            let (dot_guided, guided) = if scale == 1.0 {
                (dc, cc)
            } else {
                let zeros = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
                let nulls = null.index_select(&zeros).unwrap();
                let (du, cu) = logp(&nulls, &(zeros + model.null_dot()));
                (&du + (dc - &du) * scale, &cu + (cc - &cu) * scale)
            };
            assert!(
                guided.argmax(-1, false).equal(&codes),
                "{name}, guidance {scale}: cached {codes} vs full {}",
                guided.argmax(-1, false)
            );
            if !given {
                assert!(
                    dot_guided.argmax(-1, false).equal(&dot),
                    "{name}: dot {dot}"
                );
            }
        }
    }
}
