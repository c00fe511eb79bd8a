//! CLIP training: a tiny model learns shapes retrieval through the runtime; the global-batch loss
//! over 2 Gloo ranks gives exactly the one-process gradient; HF directories and run directories load.
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use unclip_clip::load::load_clip;
use unclip_clip::loss::{contrastive_loss, contrastive_loss_with_negatives, HardNegatives};
use unclip_clip::task::{ensure_shards, ClipTask, ClipTrainConfig};
use unclip_clip::Clip;
use unclip_dist::launch::launch_local;
use unclip_train::config::parse_config;

/// libtorch's generator is process-wide: tests that seed it take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> ClipConfig {
    ClipConfig {
        embed_dim: 16,
        vision: VisionConfig {
            image_size: 16,
            patch_size: 4,
            width: 32,
            layers: 2,
            heads: 2,
            mlp_width: None,
            resnet_layers: Vec::new(),
        },
        text: TextConfig {
            vocab_size: 49_408,
            context_length: 24,
            width: 32,
            layers: 2,
            heads: 2,
            mlp_width: None,
        },
        activation: Activation::QuickGelu,
        logit_scale_init: (1.0f64 / 0.07).ln(),
        logit_scale_max: 100.0,
        layer_norm_eps: 1e-5,
    }
}

fn run_config(dir: &Path, steps: u64) -> String {
    run_config_with(
        dir,
        steps,
        "{image_size: 16, patch_size: 4, width: 48, layers: 2, heads: 4}",
    )
}

fn run_config_with(dir: &Path, steps: u64, vision: &str) -> String {
    format!(
        "
seed: 0
device: cpu
model:
  embed_dim: 48
  vision: {vision}
  text: {{context_length: 24, width: 48, layers: 2, heads: 4}}
data:
  train:
    shards: {d}/train-{{000000..000003}}.tar
    generate: {{count: 2000, resolution: 32, seed: 1, shard_size: 500}}
  held_out:
    shards: {d}/val-000000.tar
    generate: {{count: 128, resolution: 32, seed: 2}}
  held_out_count: 32
  image: {{resolution: 16}}
  shuffle_buffer: 200
eval: {{every: {steps}}}
train: {{steps: {steps}, batch_size: 64, lr: 2.0e-3, warmup_steps: 10, weight_decay: 0.05, ema_decay: 0.9}}
logging: {{every: 20, progress: off}}
checkpoint: {{every: {steps}}}
",
        d = dir.display()
    )
}

#[test]
fn a_tiny_clip_learns_shapes_retrieval() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = parse_config::<ClipTrainConfig>(&run_config(tmp.path(), 120), &[]).unwrap();
    ensure_shards(&cfg.task.data.train).unwrap();
    ensure_shards(&cfg.task.data.held_out).unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = ClipTask::new(&vs, &cfg.task, 0, 64, 0, 1).unwrap();
    let before = task.held_out_eval().unwrap().unwrap();
    let (i2t0, t2i0) = (before.i2t, before.t2i);
    let run = tmp.path().join("run");
    let summary =
        unclip_train::train(&mut task, &vs, &cfg.runtime, &cfg.resolved, &run, None).unwrap();
    let first: f64 = summary.losses[..10].iter().map(|l| l.1).sum::<f64>() / 10.0;
    let last: f64 = summary.losses[110..].iter().map(|l| l.1).sum::<f64>() / 10.0;
    assert!(last < first * 0.8, "loss {first:.3} -> {last:.3}");
    let after = task.held_out_eval().unwrap().unwrap();
    let (i2t, t2i) = (after.i2t, after.t2i);
    // Chance is 1/32.
    assert!(
        t2i >= 0.2 && i2t >= 0.2 && t2i > t2i0,
        "held-out top-1 before ({i2t0}, {t2i0}) after ({i2t}, {t2i})"
    );

    // The run directory loads for inference with its EMA weights.
    let loaded = load_clip(&run, Device::Cpu).unwrap();
    assert!(loaded.source.contains("EMA"), "{}", loaded.source);
    assert_eq!(loaded.image.resolution, 16);
}

/// CLIP's ResNet tower through the runtime, with NegCLIP's hard negatives in the loss: the loss
/// falls, the BatchNorm running statistics are checkpointed and the negatives are a function of
/// the step (a run of 2N steps and one of N + resume + N end bit-identical, running averages
/// included), and the run directory embeds in evaluation mode as the trainer evaluated (to float
/// rounding: the two models run their convolutions separately).
#[test]
fn a_tiny_resnet_clip_trains_and_resumes_exactly() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vision = "{image_size: 16, resnet_layers: [1, 1], width: 16, heads: 4}";
    let config = |steps: u64| {
        run_config_with(tmp.path(), steps, vision).replace(
            &format!("checkpoint: {{every: {steps}}}"),
            "checkpoint: {every: 20, keep_last: 5}\nhard_negatives: {swap: [[circle, square, triangle, star, hexagon, diamond]]}",
        )
    };
    let run = |dir: &Path, steps: u64, resume: Option<&str>| {
        let cfg = parse_config::<ClipTrainConfig>(&config(steps), &[]).unwrap();
        ensure_shards(&cfg.task.data.train).unwrap();
        ensure_shards(&cfg.task.data.held_out).unwrap();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut task = ClipTask::new(&vs, &cfg.task, 0, 64, 0, 1).unwrap();
        let summary =
            unclip_train::train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, resume).unwrap();
        (vs, task, summary)
    };
    let (vs, task, summary) = run(&tmp.path().join("whole"), 40, None);
    let first: f64 = summary.losses[..5].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let last: f64 = summary.losses[35..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    assert!(last < first * 0.8, "loss {first:.3} -> {last:.3}");
    let accuracy = task
        .held_out_eval()
        .unwrap()
        .and_then(|e| e.hard_negatives)
        .expect("held-out twins");
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");
    let split = tmp.path().join("split");
    run(&split, 20, None);
    let (vs2, _, _) = run(&split, 40, Some("auto"));
    let (a, b) = (vs.variables(), vs2.variables());
    assert!(a.contains_key("visual.layer2.0.bn1.running_var"));
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after resume");
    }
    // The EMA weights `load_clip` takes embed as the trainer's EMA evaluation does.
    let loaded = load_clip(&tmp.path().join("whole"), Device::Cpu).unwrap();
    assert!(!loaded.model.is_training());
    let pixels = Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let _g = tch::no_grad_guard();
    let ours = loaded.model.encode_image(&pixels).unwrap();
    let ema: HashMap<String, Tensor> = Tensor::read_safetensors(
        summary
            .last_checkpoint
            .as_ref()
            .expect("a final checkpoint")
            .join("ema.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect();
    unclip_train::trainer::load_into(&vs, &ema, "EMA weights").unwrap();
    task.model.set_training(false);
    let want = task.model.encode_image(&pixels).unwrap();
    let d = (&ours - &want).abs().max().double_value(&[]);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn hugging_face_directories_load_with_their_config() {
    let _serial = serial(); // building the model draws its (overwritten) initial weights
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_clip");
    let loaded = load_clip(&dir, Device::Cpu).unwrap();
    let c = &loaded.model.cfg;
    assert_eq!(
        (
            c.embed_dim,
            c.text.vocab_size,
            c.text.context_length,
            c.vision.mlp()
        ),
        (24, 1000, 16, 96)
    );
    assert_eq!(loaded.image.normalize, unclip_data::images::Normalize::Clip);
    let io: HashMap<String, Tensor> = Tensor::read_safetensors(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_io.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect();
    let got = tch::no_grad(|| loaded.model.encode_image(&io["pixels"]).unwrap());
    let d = (got - &io["image_proj"]).abs().max().double_value(&[]);
    assert!(d < 1e-4, "{d}");
}

/// Gradients of the global-batch loss, averaged over ranks as the runtime does.
fn global_batch_gradients(rank: usize, world: usize) -> HashMap<String, Tensor> {
    let group = (world > 1).then(|| {
        let env = unclip_dist::DistEnv::from_env().unwrap().unwrap();
        unclip_dist::ProcessGroup::gloo(&env, Duration::from_secs(30)).unwrap()
    });
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(vs.root(), &tiny()).unwrap();
    let n = 8i64;
    let pixels = Tensor::randn([n, 3, 16, 16], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(1, 1000, [n, 24], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 10, 1).fill_(49_407);
    let local = n / world as i64;
    let (px, id) = (
        pixels.narrow(0, rank as i64 * local, local),
        ids.narrow(0, rank as i64 * local, local),
    );
    // Each caption's hard negative: other tokens; rows 1 and 6 have none.
    let neg_ids = ids.roll([3], [1]);
    let valid = Tensor::from_slice(&[true, false, true, true, true, true, false, true]);
    let img = model.encode_image(&px).unwrap();
    let txt = model.encode_text(&id).unwrap().embeds;
    let neg = model
        .encode_text(&neg_ids.narrow(0, rank as i64 * local, local))
        .unwrap()
        .embeds;
    let negatives = HardNegatives {
        text_embeds: &neg,
        valid: &valid.narrow(0, rank as i64 * local, local),
    };
    // Both losses, so the gathering of the plain and the NegCLIP loss are checked in one launch.
    let plain = contrastive_loss(&img, &txt, &model.logit_scale(), group.as_ref()).unwrap();
    let with_negatives = contrastive_loss_with_negatives(
        &img,
        &txt,
        &negatives,
        &model.logit_scale(),
        group.as_ref(),
    )
    .unwrap();
    (plain.loss + with_negatives.loss).backward();
    let mut grads = HashMap::new();
    // The same collective order on every rank.
    let vars: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, var) in vars {
        let mut g = var.grad().copy();
        if let Some(pg) = &group {
            pg.all_reduce_mean(&mut g).unwrap();
        }
        grads.insert(name, g);
    }
    grads
}

#[test]
#[ignore = "a rank of global_batch_loss_over_two_ranks_matches_one_process"]
fn global_batch_rank() {
    let Ok(out) = std::env::var("UNCLIP_TEST_GRADS") else {
        return;
    };
    let env = unclip_dist::DistEnv::from_env().unwrap().unwrap();
    let grads = global_batch_gradients(env.rank, env.world_size);
    if env.rank == 0 {
        let named: Vec<(String, Tensor)> = grads.into_iter().collect();
        Tensor::write_safetensors(&named, &out).unwrap();
    }
    println!("rank {} done", env.rank);
}

#[test]
fn global_batch_loss_over_two_ranks_matches_one_process() {
    let _serial = serial();
    let single = global_batch_gradients(0, 1);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grads.safetensors");
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "global_batch_rank",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let env = [("UNCLIP_TEST_GRADS", out.to_str().unwrap())];
    let ranks = launch_local(&exe, &args, 2, &env, Duration::from_secs(120)).expect("ranks hang");
    for r in &ranks {
        assert!(
            r.success,
            "rank {} failed:\n{}",
            r.rank,
            ranks
                .iter()
                .map(|r| r.output.as_str())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
    }
    let multi: HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(multi.len(), single.len());
    let mut largest = 0.0f64;
    for (name, g) in &single {
        let d = (g - &multi[name]).abs().max().double_value(&[]);
        largest = largest.max(g.abs().max().double_value(&[]));
        assert!(d < 1e-6, "{name}: gradient differs by {d}");
    }
    assert!(largest > 1e-3, "gradients are not trivially zero");
}

#[test]
fn a_bad_hard_negative_group_is_named_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml =
        run_config(tmp.path(), 10) + "hard_negatives: {swap: [[red, green], [circle, Red]]}\n";
    let err = format!(
        "{:#}",
        parse_config::<ClipTrainConfig>(&yaml, &[]).unwrap_err()
    );
    assert!(
        err.contains("hard_negatives.swap") && err.contains("\"Red\""),
        "{err}"
    );
    assert!(
        !tmp.path().join("train-000000.tar").exists(),
        "no data written"
    );
}

#[test]
fn initialisation_is_reproducible_for_a_seed() {
    let _serial = serial();
    let init = || {
        tch::manual_seed(42);
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Clip::new(vs.root(), &tiny()).unwrap();
        unclip_clip::init_clip_weights(&vs, &tiny(), "");
        vs
    };
    let (a, b) = (init(), init());
    let vb = b.variables();
    for (name, t) in a.variables() {
        assert!(
            t.equal(&vb[&name]),
            "{name} differs between two inits with one seed"
        );
    }
}
