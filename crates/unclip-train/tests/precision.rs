//! bf16 autocast against torch.autocast("cpu", bfloat16), and a bf16 training run.
mod common;

use tch::{nn, Device, Kind, Tensor};
use unclip_train::precision::{autocast, set_tf32, tf32_enabled, Precision};
use unclip_train::toy::{ToyConfig, ToyTask};
use unclip_train::{config::parse_config, train};

/// libtorch's generator and autocast state are process-wide and tests run on parallel threads:
/// one test at a time, so each run sees the random numbers its seed gives.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn autocast_matches_pytorch_and_restores_fp32() {
    let _serial = serial();
    let f = common::fixture("autocast.safetensors");
    let (x, w, b) = (&f["x"], &f["w"], &f["bias"]);
    {
        let _guard = autocast(Device::Cpu, Precision::Bf16);
        let lin = x.linear(w, Some(b));
        assert_eq!(lin.kind(), Kind::BFloat16);
        assert!(
            lin.to_kind(Kind::Float).equal(&f["linear"]),
            "linear differs from torch.autocast"
        );
        let mm = x.matmul(&w.tr());
        assert!(
            mm.to_kind(Kind::Float).equal(&f["matmul"]),
            "matmul differs from torch.autocast"
        );
        let sm = x.softmax(-1, None::<Kind>);
        assert_eq!(sm.kind(), Kind::Float, "softmax stays fp32 under autocast");
        assert!(sm.allclose(&f["softmax"], 1e-6, 1e-7, false));
        // Nested fp32 region: nothing changes, and leaving it keeps bf16 on.
        assert!(autocast(Device::Cpu, Precision::Fp32).is_none());
        assert_eq!(x.linear(w, Some(b)).kind(), Kind::BFloat16);
    }
    assert_eq!(
        x.linear(w, Some(b)).kind(),
        Kind::Float,
        "autocast is off after the guard"
    );

    set_tf32(false);
    assert!(!tf32_enabled());
    set_tf32(true);
    assert!(tf32_enabled());
}

#[test]
fn bf16_training_keeps_fp32_master_weights_and_learns() {
    let _serial = serial();
    let cfg = parse_config::<ToyConfig>(
        common::CONFIG,
        &["train.precision=bf16".into(), "train.steps=60".into()],
    )
    .unwrap();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = ToyTask::new(&vs, &cfg.task, 64).unwrap();
    let (summary, _tmp) = common::train_in_temp_dir(&mut task, &vs, &cfg);
    let mean = |s: &[(u64, f64)]| s.iter().map(|l| l.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&summary.losses[..10]), mean(&summary.losses[50..]));
    assert!(last < 0.8 * first, "bf16 loss {first:.3} -> {last:.3}");
    assert!(
        vs.variables().values().all(|v| v.kind() == Kind::Float),
        "master weights stay fp32"
    );
    let ck = unclip_train::checkpoint::load(summary.last_checkpoint.as_ref().unwrap()).unwrap();
    assert!(ck
        .model
        .values()
        .chain(ck.optimizer.values())
        .all(|t| t.kind() == Kind::Float));
    let err =
        parse_config::<ToyConfig>(common::CONFIG, &["train.precision=fp8".into()]).unwrap_err();
    assert!(
        format!("{err:#}").contains("train.precision: unknown variant `fp8`"),
        "{err:#}"
    );
}

/// A two-layer convolutional regression: the smallest model whose weights channels-last touches.
struct ConvRegression {
    net: nn::Sequential,
}

impl unclip_train::TrainTask for ConvRegression {
    type Batch = (Tensor, Tensor);
    fn next_batch(&mut self, _: u64, _: usize) -> anyhow::Result<(Tensor, Tensor)> {
        let x = Tensor::randn([8, 3, 16, 16], (Kind::Float, Device::Cpu));
        let y = x.mean_dim(1, true, Kind::Float).tanh();
        Ok((x, y))
    }
    fn loss(&mut self, (x, y): &(Tensor, Tensor)) -> anyhow::Result<unclip_train::StepOutput> {
        use tch::nn::Module;
        Ok(unclip_train::StepOutput {
            loss: (self.net.forward(x) - y).square().mean(Kind::Float),
            samples: 8,
            metrics: vec![],
        })
    }
}

fn conv_run(dir: &std::path::Path, channels_last: bool) -> (nn::VarStore, Vec<(u64, f64)>) {
    let text = format!(
        "device: cpu\ntrain: {{steps: 30, lr: 0.01, ema_decay: 0.9, channels_last: {channels_last}}}\n\
         logging: {{progress: off, tensorboard: false}}\ncheckpoint: {{every: 30}}\n"
    );
    let cfg =
        parse_config::<ToyConfig>(&format!("{text}{}", "model: {hidden: 8, depth: 1}\n"), &[])
            .unwrap();
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let conv = |name: &str, i, o| {
        nn::conv2d(
            &p / name,
            i,
            o,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        )
    };
    let net = nn::seq()
        .add(conv("c1", 3, 16))
        .add_fn(|x| x.relu())
        .add(conv("c2", 16, 1));
    let mut task = ConvRegression { net };
    let summary = train(&mut task, &vs, &cfg.runtime, &cfg.resolved, dir, None).unwrap();
    (vs, summary.losses)
}

#[test]
fn channels_last_weights_train_like_contiguous_ones_and_save_plainly() {
    use unclip_train::precision::is_channels_last;
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (plain_vs, plain) = conv_run(&tmp.path().join("plain"), false);
    let (cl_vs, cl) = conv_run(&tmp.path().join("cl"), true);
    let vars = cl_vs.variables();
    assert!(is_channels_last(&vars["c1.weight"]) && is_channels_last(&vars["c2.weight"]));
    assert!(!is_channels_last(&plain_vs.variables()["c1.weight"]));
    // Same data and start; only the kernels' summation order differs, and 30 Adam steps amplify
    // that a little (a wrong layout would give unrelated losses).
    assert_eq!(plain.len(), cl.len());
    for ((_, a), (_, b)) in plain.iter().zip(&cl) {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-3), "{a} vs {b}");
    }
    assert!(cl.last().unwrap().1 < 0.5 * cl[0].1, "loss falls: {:?}", cl);
    // The checkpoint holds the weights in their logical (NCHW) order.
    let ck = unclip_train::checkpoint::load(
        &unclip_train::checkpoint::checkpoints_dir(&tmp.path().join("cl")).join("step-000000030"),
    )
    .unwrap();
    for (name, var) in &vars {
        assert!(ck.model[name].equal(var), "{name}");
    }
}

#[test]
fn auto_precision_is_bf16_on_cuda_and_amx_cpus_and_fp32_elsewhere() {
    use unclip_train::precision::{resolve_for, CpuBf16, Resolved};
    let auto = |cuda, cpu| resolve_for(Precision::Auto, cuda, cpu);
    assert_eq!(auto(true, CpuBf16::Emulated).precision, Precision::Bf16);
    assert_eq!(auto(false, CpuBf16::Amx).precision, Precision::Bf16);
    for cpu in [CpuBf16::Avx512, CpuBf16::Emulated] {
        let r = auto(false, cpu);
        assert_eq!(r.precision, Precision::Fp32);
        assert!(r.note.unwrap().contains("no AMX-BF16"));
    }
    // An explicit bf16 is kept, with a warning only where it is emulated.
    let slow = resolve_for(Precision::Bf16, false, CpuBf16::Emulated);
    assert_eq!(slow.precision, Precision::Bf16);
    assert!(slow.note.unwrap().starts_with("warning:"));
    for (p, cuda, cpu) in [
        (Precision::Bf16, false, CpuBf16::Amx),
        (Precision::Bf16, false, CpuBf16::Avx512),
        (Precision::Bf16, true, CpuBf16::Emulated),
        (Precision::Fp32, false, CpuBf16::Emulated),
        (Precision::Fp16, true, CpuBf16::Emulated),
    ] {
        let want = Resolved {
            precision: p,
            note: None,
        };
        assert_eq!(resolve_for(p, cuda, cpu), want);
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn cpu_bf16_detection_agrees_with_the_kernel() {
    use unclip_train::precision::{cpu_bf16, CpuBf16};
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    let kernel_says = if has("amx_bf16") {
        CpuBf16::Amx
    } else if has("avx512_bf16") {
        CpuBf16::Avx512
    } else {
        CpuBf16::Emulated
    };
    assert_eq!(cpu_bf16(), kernel_says, "{flags}");
}

/// Records the dtype a linear layer computes in under the trainer's autocast.
struct KindProbe {
    lin: nn::Linear,
    kinds: Vec<Kind>,
}

impl unclip_train::TrainTask for KindProbe {
    type Batch = Tensor;
    fn next_batch(&mut self, _: u64, _: usize) -> anyhow::Result<Tensor> {
        Ok(Tensor::randn([4, 8], (Kind::Float, Device::Cpu)))
    }
    fn loss(&mut self, x: &Tensor) -> anyhow::Result<unclip_train::StepOutput> {
        use tch::nn::Module;
        let y = self.lin.forward(x);
        self.kinds.push(y.kind());
        Ok(unclip_train::StepOutput {
            loss: y.square().mean(Kind::Float),
            samples: 4,
            metrics: vec![],
        })
    }
}

/// The dtypes `KindProbe` saw over a 2-step run at `train.precision: precision`.
fn probe_kinds(precision: Precision) -> Vec<Kind> {
    let text = format!(
        "device: cpu\ntrain: {{steps: 2, precision: {}}}\n\
         logging: {{progress: off, tensorboard: false}}\ncheckpoint: {{every: 2}}\n\
         model: {{hidden: 8, depth: 1}}\n",
        precision.name()
    );
    let cfg = parse_config::<ToyConfig>(&text, &[]).unwrap();
    assert_eq!(cfg.runtime.train.precision, precision);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "lin", 8, 8, Default::default());
    let mut task = KindProbe { lin, kinds: vec![] };
    let (_, _tmp) = common::train_in_temp_dir(&mut task, &vs, &cfg);
    task.kinds
}

#[test]
fn the_trainer_computes_in_the_precision_auto_resolves_to() {
    let _serial = serial();
    // The probe sees autocast: explicit bf16 computes in bf16 on any CPU.
    assert_eq!(probe_kinds(Precision::Bf16), vec![Kind::BFloat16; 2]);
    let want = match unclip_train::precision::resolve(Precision::Auto, Device::Cpu).precision {
        Precision::Bf16 => Kind::BFloat16,
        _ => Kind::Float,
    };
    assert_eq!(probe_kinds(Precision::Auto), vec![want; 2]);
}
