//! Two real processes on loopback: this test binary re-runs itself as rank 0 and rank 1.
use std::time::Duration;
use tch::{Kind, Tensor};
use unclip_dist::launch::launch_local;
use unclip_dist::{DistEnv, GradReducer, ProcessGroup, Reduced, ReducerOptions};

/// Runs `worker` (an ignored test of this file) as ranks 0..world: (exit ok, output) each.
fn launch(worker: &str, world: usize) -> Vec<(bool, String)> {
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        worker,
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    launch_local(
        &exe,
        &args,
        world,
        &[("UNCLIP_DIST_WORKER", "1")],
        Duration::from_secs(60),
    )
    .expect("a rank hangs")
    .into_iter()
    .map(|r| (r.success, r.output))
    .collect()
}

fn worker_group() -> Option<ProcessGroup> {
    std::env::var("UNCLIP_DIST_WORKER").ok()?;
    let env = DistEnv::from_env()
        .unwrap()
        .expect("launched with RANK/WORLD_SIZE");
    Some(ProcessGroup::gloo(&env, Duration::from_secs(10)).unwrap())
}

/// Runs `worker` as two ranks, each of which must end printing `rank R ok`.
fn assert_every_rank_ok(worker: &str) {
    for (rank, (ok, out)) in launch(worker, 2).iter().enumerate() {
        assert!(
            *ok && out.contains(&format!("rank {rank} ok")),
            "rank {rank} failed:\n{out}"
        );
    }
}

#[test]
#[ignore = "a rank of collectives_agree_across_two_ranks"]
fn collectives_worker() {
    let Some(pg) = worker_group() else { return };
    let r = pg.rank() as f64;
    let mut b = if pg.rank() == 0 {
        Tensor::from_slice(&[7.0f32, 8.0])
    } else {
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))
    };
    pg.broadcast(&mut b, 0).unwrap();
    assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![7.0, 8.0]);
    let mut s = Tensor::from_slice(&[r + 1.0, 10.0 * r]);
    pg.all_reduce_sum(&mut s).unwrap();
    assert_eq!(Vec::<f64>::try_from(&s).unwrap(), vec![3.0, 10.0]);
    let mut m = Tensor::from_slice(&[r + 1.0]);
    pg.all_reduce_mean(&mut m).unwrap();
    assert_eq!(Vec::<f64>::try_from(&m).unwrap(), vec![1.5]);
    let g = pg.all_gather(&Tensor::from_slice(&[r, r + 0.5])).unwrap();
    assert_eq!(g.size(), vec![2, 2]);
    assert_eq!(
        Vec::<f64>::try_from(g.flatten(0, -1)).unwrap(),
        vec![0.0, 0.5, 1.0, 1.5]
    );
    pg.barrier().unwrap();
    println!("rank {} ok", pg.rank());
}

#[test]
fn collectives_agree_across_two_ranks() {
    assert_every_rank_ok("collectives_worker");
}

#[test]
#[ignore = "a rank of a_dead_rank_is_an_error_not_a_hang"]
fn dying_worker() {
    let Some(pg) = worker_group() else { return };
    if pg.rank() == 1 {
        std::process::exit(3); // dies right after the rendezvous
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
    let err = pg.all_reduce_sum(&mut t).unwrap_err();
    println!("rank 0 error: {err}");
    std::process::exit(2);
}

#[test]
fn a_dead_rank_is_an_error_not_a_hang() {
    let results = launch("dying_worker", 2);
    let (ok, out) = &results[0];
    assert!(
        !*ok && out.contains("rank 0 error: c10d all_reduce"),
        "rank 0 should fail cleanly:\n{out}"
    );
}

/// The reducer test's variables: one over the 1 MiB first bucket, two small ones, a channels-last
/// one, and one that only rank 0 uses.
fn reducer_vars() -> Vec<Tensor> {
    let a = Tensor::arange(300_000, (Kind::Float, tch::Device::Cpu)) * 1e-6;
    let b = Tensor::linspace(-1.0, 1.0, 1000, (Kind::Float, tch::Device::Cpu));
    let c = Tensor::linspace(0.5, 2.0, 50, (Kind::Float, tch::Device::Cpu));
    let d = Tensor::linspace(-2.0, 2.0, 120, (Kind::Float, tch::Device::Cpu))
        .view([2, 4, 5, 3])
        .permute([0, 3, 1, 2]); // [2, 3, 4, 5] with channels-last strides
    let only0 = Tensor::ones([5], (Kind::Float, tch::Device::Cpu));
    [a, b, c, d, only0]
        .into_iter()
        .map(|t| t.set_requires_grad(true))
        .collect()
}

/// Rank `rank`'s loss at `round` on `vars` (rank 0 alone uses the last variable).
fn reducer_loss(vars: &[Tensor], rank: usize, round: i64) -> Tensor {
    tch::manual_seed(1000 * round + rank as i64);
    let x: Vec<Tensor> = vars.iter().map(Tensor::randn_like).collect();
    let mut loss = (&vars[0] * &x[0]).sum(Kind::Float)
        + (vars[1].sin() * &x[1]).sum(Kind::Float)
        + (&vars[2] * &vars[2] * &x[2]).sum(Kind::Float)
        + (vars[3].cos() * &x[3]).sum(Kind::Float);
    if rank == 0 {
        loss += (&vars[4] * &x[4]).sum(Kind::Float);
    }
    loss
}

/// Rank `rank`'s gradients for `rounds` backward passes on fresh copies of the variables (None:
/// no gradient).
fn reducer_local_grads(rank: usize, rounds: &[i64]) -> Vec<Option<Tensor>> {
    let vars = reducer_vars();
    for &r in rounds {
        reducer_loss(&vars, rank, r).backward();
    }
    vars.iter()
        .map(|v| Some(v.grad()).filter(Tensor::defined))
        .collect()
}

/// Checks that every gradient is the two ranks' mean, bit for bit; `round` names the rounds.
fn assert_mean_grads(vars: &[Tensor], rounds: &[i64], bf16: bool, what: &str) {
    assert_mean_grads_kept(vars, rounds, bf16, |_| true, what)
}

/// [`assert_mean_grads`] for the variables `kept` names; the others have no gradient.
fn assert_mean_grads_kept(
    vars: &[Tensor],
    rounds: &[i64],
    bf16: bool,
    kept: impl Fn(usize) -> bool,
    what: &str,
) {
    check_owner_means(vars, rounds, bf16, kept, what, true)
}

/// The owners' gradients are the mean over ranks of each rank's sum over `rounds`, reduced round
/// by round (so in another order than one rank's accumulation: to rounding); the others have none.
fn assert_mean_sums_kept(
    vars: &[Tensor],
    rounds: &[i64],
    bf16: bool,
    kept: impl Fn(usize) -> bool,
    what: &str,
) {
    check_owner_means(vars, rounds, bf16, kept, what, false)
}

/// The gradients `kept` names are the ranks' mean over `rounds` — bit for bit (`exact`, in the
/// type the buckets travelled in), or to rounding; the others have none.
fn check_owner_means(
    vars: &[Tensor],
    rounds: &[i64],
    bf16: bool,
    kept: impl Fn(usize) -> bool,
    what: &str,
    exact: bool,
) {
    let (g0, g1) = (
        reducer_local_grads(0, rounds),
        reducer_local_grads(1, rounds),
    );
    for (i, v) in vars.iter().enumerate() {
        let got = v.grad();
        if !kept(i) {
            assert!(!got.defined(), "{what}: variable {i} kept its gradient");
            continue;
        }
        assert!(got.defined(), "{what}: variable {i} has no gradient");
        let zeros = v.zeros_like();
        let (a, b) = (
            g0[i].as_ref().unwrap_or(&zeros),
            g1[i].as_ref().unwrap_or(&zeros),
        );
        let diff = |want: &Tensor| (&got - want).abs().max().double_value(&[]);
        if exact {
            let want = if bf16 {
                ((a.to_kind(Kind::BFloat16) + b.to_kind(Kind::BFloat16)) / 2.0).to_kind(Kind::Float)
            } else {
                (a + b) / 2.0
            };
            let diff = diff(&want);
            assert_eq!(
                diff, 0.0,
                "{what}: variable {i} differs from the mean by {diff}"
            );
        } else {
            let want = (a + b) / 2.0;
            let scale = want.abs().max().double_value(&[]).max(1.0);
            let tolerance = if bf16 { 2e-2 } else { 1e-6 } * scale;
            let diff = diff(&want);
            assert!(
                diff <= tolerance,
                "{what}: variable {i}'s sum is off by {diff}"
            );
        }
    }
}

#[test]
#[ignore = "a rank of the gradient reducer test"]
fn grad_reducer_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    let vars = reducer_vars();
    let options = |bucket_bytes: usize, bf16: bool, bucket_views: bool| ReducerOptions {
        bucket_bytes,
        bf16,
        bucket_views,
        ..Default::default()
    };
    {
        let reducer = GradReducer::new(&pg, &vars, &options(4096, false, false)).unwrap();
        // The first overlapped step fixes the buckets (so starts none in backward); rank 1 gets
        // the variable only rank 0 used.
        let first = reducer_step(&reducer, &vars, rank, true, &[1]);
        assert!(!first.late && first.started_in_backward == 0, "{first:?}");
        assert_mean_grads(&vars, &[1], false, "first overlapped step");
        let second = reducer_step(&reducer, &vars, rank, true, &[2]);
        assert!(!second.late && second.buckets >= 2, "{second:?}");
        if rank == 0 {
            // Every gradient arrives here, so every bucket starts during backward.
            assert_eq!(second.started_in_backward, second.buckets, "{second:?}");
        }
        assert_mean_grads(&vars, &[2], false, "overlapped step");
        // Two backward passes in one armed step: every variable's second gradient arrives after
        // its bucket started, which `wait` reports on both ranks.
        assert!(reducer_step(&reducer, &vars, rank, true, &[3, 4]).late);
        assert_mean_grads(&vars, &[3, 4], false, "late gradients, averaged again");
        let plain = reducer_step(&reducer, &vars, rank, false, &[5]);
        assert!(!plain.late && plain.started_in_backward == 0, "{plain:?}");
        assert_mean_grads(&vars, &[5], false, "not overlapped");
    }
    {
        // Bucket views (bf16 buckets cannot be views: copies, as above).
        let reducer = GradReducer::new(&pg, &vars, &options(1 << 20, true, true)).unwrap();
        assert!(!reducer_step(&reducer, &vars, rank, true, &[6]).late);
        assert!(!reducer_step(&reducer, &vars, rank, true, &[7]).late);
        assert_mean_grads(&vars, &[7], true, "bf16, overlapped");
        let err = reducer.wait().unwrap_err().to_string();
        assert!(err.contains("wait without arm"), "{err}");
    }
    // Gradients as views into fp32 buckets, averaged in place.
    let vars = reducer_vars();
    let reducer = GradReducer::new(&pg, &vars, &options(4096, false, true)).unwrap();
    assert!(!reducer_step(&reducer, &vars, rank, true, &[8]).late);
    assert_mean_grads(&vars, &[8], false, "bucket views, first step");
    let second = reducer_step(&reducer, &vars, rank, true, &[9]);
    if rank == 0 {
        assert_eq!(second.started_in_backward, second.buckets, "{second:?}");
    }
    assert_mean_grads(&vars, &[9], false, "bucket views");
    let plain = reducer_step(&reducer, &vars, rank, false, &[10]);
    assert_eq!(plain.started_in_backward, 0);
    assert_mean_grads(&vars, &[10], false, "bucket views, not overlapped");
    // Averaged in place, a late gradient cannot be averaged again: a clear error on both ranks.
    reducer.arm(true).unwrap();
    for r in [11, 12] {
        reducer_loss(&vars, rank, r).backward();
    }
    let err = reducer.wait().unwrap_err().to_string();
    assert!(err.contains("grad_reduce: after_backward"), "{err}");
    println!("rank {rank} ok");
}

/// Zeroes every gradient that exists, in place (views into buckets stay views).
fn zero_grads(vars: &[Tensor]) {
    for v in vars {
        let g = v.grad();
        if g.defined() {
            let _ = g.shallow_clone().zero_();
        }
    }
}

/// One armed step of `reducer`: zeroed gradients, backward of `rounds`, wait, finish — or, when
/// a gradient came in late, as the trainer does: drop the overlapped averages and average again
/// after backward.
fn reducer_step(
    reducer: &GradReducer,
    vars: &[Tensor],
    rank: usize,
    overlap: bool,
    rounds: &[i64],
) -> Reduced {
    zero_grads(vars);
    reducer.arm(overlap).unwrap();
    for &r in rounds {
        let loss = reducer_loss(vars, rank, r);
        // (Under ZeRO-2 the first step's buckets then follow the graph.)
        reducer.expect_gradients_of(&loss).unwrap();
        loss.backward();
    }
    let reduced = reducer.wait().unwrap();
    if reduced.late {
        reducer.finish(false).unwrap();
        reducer.arm(false).unwrap();
        assert!(!reducer.wait().unwrap().late);
    }
    reducer.finish(true).unwrap();
    reduced
}

#[test]
#[ignore = "a rank of the sharded gradient reducer test"]
fn sharded_grad_reducer_worker() {
    let Some(pg) = worker_group() else { return };
    let rank = pg.rank();
    // Rank 1 owns the variable only rank 0 uses, and a channels-last one is rank 0's.
    let owners = vec![0, 1, 1, 0, 1];
    let kept = |i: usize| owners[i] == rank;
    for (bf16, bucket_views) in [(false, true), (false, false), (true, false)] {
        let what = format!("sharded, bf16 {bf16}, views {bucket_views}");
        let vars = reducer_vars();
        let options = ReducerOptions {
            bucket_bytes: 4096,
            bf16,
            bucket_views,
            owners: Some(owners.clone()),
            expected_order: None,
        };
        let reducer = GradReducer::new(&pg, &vars, &options).unwrap();
        // The first step sends buckets of the expected order during backward (rank 0 has every
        // gradient, so all of them), then fixes the buckets; the owner holds each mean, the other
        // rank nothing.
        let first = reducer_step(&reducer, &vars, rank, true, &[1]);
        if rank == 0 {
            assert_eq!(
                first.started_in_backward, first.buckets,
                "{what}: {first:?}"
            );
        }
        assert_mean_grads_kept(&vars, &[1], bf16, kept, &format!("{what}, first step"));
        let second = reducer_step(&reducer, &vars, rank, true, &[2]);
        assert!(second.buckets >= 2, "{what}: {second:?}");
        if rank == 0 {
            assert_eq!(
                second.started_in_backward, second.buckets,
                "{what}: {second:?}"
            );
        }
        assert_mean_grads_kept(&vars, &[2], bf16, kept, &format!("{what}, overlapped"));
        let plain = reducer_step(&reducer, &vars, rank, false, &[3]);
        assert_eq!(plain.started_in_backward, 0, "{what}: {plain:?}");
        assert_mean_grads_kept(&vars, &[3], bf16, kept, &format!("{what}, after backward"));
        // Two micro-batches, each reduced to the owners as it comes: the owner ends with the mean
        // of the ranks' sums (in another order than one rank's accumulation: to rounding).
        zero_grads(&vars);
        for (r, last) in [(6, false), (7, true)] {
            reducer.arm_backward(true, last).unwrap();
            reducer_loss(&vars, rank, r).backward();
            assert!(!reducer.wait().unwrap().late);
            reducer.finish(true).unwrap();
            for (i, v) in vars.iter().enumerate() {
                assert_eq!(
                    v.grad().defined(),
                    kept(i),
                    "{what}: variable {i} after round {r}"
                );
            }
        }
        assert_mean_sums_kept(
            &vars,
            &[6, 7],
            bf16,
            kept,
            &format!("{what}, micro-batches"),
        );
        // The other rank's gradients were dropped as their buckets left: a late one cannot be
        // averaged again, whether or not the buckets are views.
        reducer.arm(true).unwrap();
        for r in [4, 5] {
            reducer_loss(&vars, rank, r).backward();
        }
        let err = reducer.wait().unwrap_err().to_string();
        assert!(err.contains("grad_reduce: after_backward"), "{what}: {err}");
        drop(reducer);

        // At the first step a gradient arriving after its bucket left (two backward passes: a
        // variable accumulated twice, as by a reentrant checkpoint) is sent after backward and
        // added by its owner — here every one of rank 0's, whatever the expected order.
        let vars = reducer_vars();
        let options = ReducerOptions {
            expected_order: Some(vec![0, 1, 2, 3, 4]),
            ..options
        };
        let reducer = GradReducer::new(&pg, &vars, &options).unwrap();
        let first = reducer_step(&reducer, &vars, rank, true, &[11, 12]);
        assert!(!first.late, "{what}: {first:?}");
        assert_mean_sums_kept(&vars, &[11, 12], bf16, kept, &format!("{what}, twice"));
        // The steps after it have learned the two accumulations: every bucket waits for both.
        let second = reducer_step(&reducer, &vars, rank, true, &[13, 14]);
        assert!(!second.late, "{what}: {second:?}");
        assert_mean_sums_kept(
            &vars,
            &[13, 14],
            bf16,
            kept,
            &format!("{what}, twice again"),
        );
    }
    // The expected order decides what the first step holds back: a chain's gradients arrive last
    // layer first. Buckets in that order go one by one; in the opposite order every gradient waits
    // for the first layer's bucket, whose gradient comes last — unless the order is read off the
    // loss's graph before backward.
    let layer_bytes = 64 * 64 * 4;
    let chain_peak_waiting = |order: Vec<usize>, from_graph: bool| -> usize {
        let layers: Vec<Tensor> = (0..4)
            .map(|k| {
                (Tensor::eye(64, (Kind::Float, tch::Device::Cpu)) * (1.0 + 0.1 * k as f64))
                    .set_requires_grad(true)
            })
            .collect();
        let options = ReducerOptions {
            bucket_bytes: layer_bytes,
            owners: Some(vec![0, 1, 0, 1]),
            expected_order: Some(order),
            ..Default::default()
        };
        let reducer = GradReducer::new(&pg, &layers, &options).unwrap();
        reducer.arm(true).unwrap();
        let mut h = Tensor::ones([8, 64], (Kind::Float, tch::Device::Cpu)) * (rank + 1) as f64;
        for w in &layers {
            h = h.matmul(w).tanh();
        }
        let loss = h.sum(Kind::Float);
        if from_graph {
            reducer.expect_gradients_of(&loss).unwrap();
        }
        loss.backward();
        let reduced = reducer.wait().unwrap();
        reducer.finish(true).unwrap();
        assert_eq!(reduced.started_in_backward, 4, "{reduced:?}");
        reduced.peak_waiting_bytes
    };
    assert_eq!(chain_peak_waiting(vec![3, 2, 1, 0], false), layer_bytes);
    assert_eq!(chain_peak_waiting(vec![0, 1, 2, 3], false), 4 * layer_bytes);
    assert_eq!(chain_peak_waiting(vec![0, 1, 2, 3], true), layer_bytes);
    let vars = reducer_vars();
    for (order, message) in [
        (vec![0, 1, 2, 3], "an expected order of 4 for 5 variables"),
        (vec![0, 1, 2, 3, 3], "not a permutation of 5 variables"),
    ] {
        let bad = ReducerOptions {
            expected_order: Some(order),
            ..Default::default()
        };
        let err = GradReducer::new(&pg, &vars, &bad).err().expect(message);
        assert!(err.to_string().contains(message), "{err}");
    }
    // Summing over backward passes is for owners: unsharded, every rank would count the sums again.
    let plain = GradReducer::new(&pg, &vars, &ReducerOptions::default()).unwrap();
    let err = plain.arm_backward(true, false).unwrap_err().to_string();
    assert!(err.contains("only a sharded reducer"), "{err}");
    let bad = ReducerOptions {
        owners: Some(vec![0, 1, 2, 0, 1]),
        ..Default::default()
    };
    let err = GradReducer::new(&pg, &vars, &bad)
        .err()
        .expect("rank 2 of 2");
    assert!(
        err.to_string().contains("owner 2, not a rank of 2"),
        "{err}"
    );
    println!("rank {rank} ok");
}

#[test]
fn sharded_grad_reducer_leaves_each_mean_on_its_owner_alone() {
    assert_every_rank_ok("sharded_grad_reducer_worker");
}

#[test]
fn grad_reducer_averages_buckets_overlapped_with_backward() {
    assert_every_rank_ok("grad_reducer_worker");
}

#[test]
fn environment_is_read_like_torchrun() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        DistEnv::from_lookup(move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    };
    assert_eq!(env(&[]).unwrap(), None, "no variables: one process");
    let e = env(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        e,
        DistEnv {
            rank: 1,
            world_size: 4,
            local_rank: 1,
            master_addr: "node0".into(),
            master_port: 1234
        }
    );
    let e = env(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")])
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.local_rank, e.master_addr.as_str(), e.master_port),
        (1, "127.0.0.1", 29500)
    );
    for (pairs, want) in [
        (&[("RANK", "0")][..], "WORLD_SIZE: unset while RANK is set"),
        (
            &[("WORLD_SIZE", "2")][..],
            "RANK: unset while WORLD_SIZE is set",
        ),
        (
            &[("RANK", "2"), ("WORLD_SIZE", "2")][..],
            "RANK: 2 is not below WORLD_SIZE 2",
        ),
        (
            &[("RANK", "x"), ("WORLD_SIZE", "2")][..],
            "RANK: `x` is not a valid number",
        ),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")][..],
            "MASTER_PORT",
        ),
    ] {
        let err = DistEnv::from_lookup(|k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains(want), "{pairs:?}: {err}");
    }
}
