//! Activation checkpointing: gradients (parameters and inputs) equal the plain block's, dropout
//! included, through chains of blocks; errors in the forward or the recomputation surface.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tch::{nn, nn::Module, Device, Kind, Tensor};
use unclip_diffusion::nn::checkpoint;
use unclip_testkit::max_abs_diff;

/// h ↦ fc2(dropout(silu(fc1(h) + emb))) + h, the shape of a ResBlock.
struct Block {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Block {
    fn new(p: nn::Path) -> Self {
        Self {
            fc1: nn::linear(&p / "fc1", 8, 8, Default::default()),
            fc2: nn::linear(&p / "fc2", 8, 8, Default::default()),
        }
    }
    fn forward(fc1: &nn::Linear, fc2: &nn::Linear, h: &Tensor, emb: &Tensor) -> Tensor {
        fc2.forward(&(fc1.forward(h) + emb).silu().dropout(0.3, true)) + h
    }
    /// The same, checkpointed: the closure owns shallow copies of the parameters.
    fn checkpointed(&self, h: &Tensor, emb: &Tensor) -> Tensor {
        let copy = |l: &nn::Linear| nn::Linear {
            ws: l.ws.shallow_clone(),
            bs: l.bs.as_ref().map(Tensor::shallow_clone),
        };
        let (fc1, fc2) = (copy(&self.fc1), copy(&self.fc2));
        let out = checkpoint(&[h, emb], move |xs: &[Tensor]| {
            Ok::<_, String>(vec![Self::forward(&fc1, &fc2, &xs[0], &xs[1])])
        })
        .unwrap();
        out.into_iter().next().unwrap()
    }
}

/// libtorch's CPU generator is global and a checkpoint's backward sets it back to replay dropout,
/// so the tests that draw from it or run a backward take turns.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parameter and input gradients of a three-block chain, plain or checkpointed.
fn gradients(checkpointed: bool) -> Vec<Tensor> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let blocks: Vec<Block> = (0..3).map(|i| Block::new(&vs.root() / i)).collect();
    let embed = nn::linear(vs.root() / "embed", 4, 8, Default::default());
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let t = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    tch::manual_seed(7); // the dropout masks
    let emb = embed.forward(&t); // a non-leaf input, as the UNet's timestep embedding
    let mut h = x.shallow_clone();
    for b in &blocks {
        h = if checkpointed {
            b.checkpointed(&h, &emb)
        } else {
            Block::forward(&b.fc1, &b.fc2, &h, &emb)
        };
    }
    h.square().sum(Kind::Float).backward();
    let mut grads: Vec<Tensor> = vs
        .variables()
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .map(|v| v.grad())
        .collect();
    grads.push(x.grad());
    grads
}

#[test]
fn gradients_equal_the_plain_blocks_dropout_included() {
    let _turn = turn();
    let (plain, ckpt) = (gradients(false), gradients(true));
    assert_eq!(plain.len(), 3 * 4 + 2 + 1);
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!(a.defined() && b.defined());
        assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(max_abs_diff(a, b) < 1e-6, "{}", max_abs_diff(a, b));
    }
}

#[test]
fn without_gradients_the_block_just_runs() {
    let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let y = tch::no_grad(|| {
        checkpoint(&[&x], move |xs: &[Tensor]| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(vec![&xs[0] * 2.0])
        })
        .unwrap()
    });
    assert_eq!(y[0].sum(Kind::Float).double_value(&[]), 12.0);
    assert!(!y[0].requires_grad());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn errors_in_the_forward_or_the_recomputation_are_reported() {
    let _turn = turn();
    let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let err = checkpoint(&[&x], |_: &[Tensor]| Err::<Vec<Tensor>, _>("no such block"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such block"), "{err}");
    // Succeeds once, fails when backward runs it again.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let y = checkpoint(&[&x], move |xs: &[Tensor]| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            Ok(vec![xs[0].exp()])
        } else {
            Err("the recomputation failed")
        }
    })
    .unwrap();
    let err = y[0].sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("the recomputation failed"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
