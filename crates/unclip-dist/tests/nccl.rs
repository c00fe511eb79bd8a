//! The NCCL backend: present in builds against the CUDA wheel, a clear error without a GPU, and
//! (on a CUDA machine, `cargo test -p unclip-dist --test nccl -- --ignored`) real collectives.
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use unclip_dist::launch::{free_port, launch_local};
use unclip_dist::{nccl_available, DistEnv, GradReducer, ProcessGroup, ReducerOptions};

#[test]
fn nccl_is_built_against_a_cuda_libtorch() {
    // LIBTORCH is what the build compiled the shim against (.cargo/config.toml from setup.sh).
    let libtorch = env!("LIBTORCH");
    let cuda_build = std::path::Path::new(libtorch)
        .join("lib/libtorch_cuda.so")
        .is_file();
    assert_eq!(
        nccl_available(),
        cuda_build,
        "the setup's CUDA wheel (with nvidia-cuda-crt / -cccl headers) must give an NCCL build"
    );
}

/// A job of one process, rendezvousing on a free local port.
fn single_process() -> DistEnv {
    DistEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port().unwrap(),
    }
}

#[test]
fn a_missing_gpu_is_a_clear_error() {
    let env = single_process();
    let visible = tch::Cuda::device_count() as usize;
    let err = ProcessGroup::nccl(&env, Duration::from_secs(5), visible)
        .err()
        .expect("no such device")
        .to_string();
    assert!(
        err.contains(&format!(
            "rank 0 wants CUDA device {visible}, but {visible} are visible"
        )),
        "{err}"
    );
}

/// Broadcast, sums, means, all-gather and a barrier on this rank's GPU.
fn check_collectives(pg: &ProcessGroup) {
    let (rank, world) = (pg.rank() as f64, pg.world_size() as f64);
    let dev = pg.device();
    assert!(dev.is_cuda());
    let mut b = Tensor::full([3], rank + 7.0, (Kind::Float, dev));
    pg.broadcast(&mut b, 0).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(b.to_device(Device::Cpu)).unwrap(),
        vec![7.0; 3]
    );
    let mut s = Tensor::full([2], rank + 1.0, (Kind::Double, dev));
    pg.all_reduce_sum(&mut s).unwrap();
    let want = world * (world + 1.0) / 2.0;
    assert_eq!(
        Vec::<f64>::try_from(s.to_device(Device::Cpu)).unwrap(),
        vec![want; 2]
    );
    let mut m = Tensor::full([1], rank, (Kind::Float, dev));
    pg.all_reduce_mean(&mut m).unwrap();
    assert_eq!(m.double_value(&[0]), (world - 1.0) / 2.0);
    let g = pg
        .all_gather(&Tensor::full([2], rank, (Kind::Float, dev)))
        .unwrap();
    assert_eq!(g.size(), vec![world as i64, 2]);
    assert_eq!(g.device(), dev);
    pg.barrier().unwrap();
    // Gloo's CPU tensors are refused by name.
    let err = pg
        .all_reduce_sum(&mut Tensor::ones([1], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(err.to_string().contains("takes tensors on Cuda"), "{err}");
    check_grad_reducer(pg);
    println!("rank {} ok", pg.rank());
}

/// Gradients averaged from backward's hooks, which on CUDA run on autograd's device thread: to
/// every rank, and sharded (ZeRO-2: `a` reduced to rank 0 alone, `b` to the last rank; two
/// backward passes a step, so the first step's second gradients arrive after their buckets left).
fn check_grad_reducer(pg: &ProcessGroup) {
    let (rank, world) = (pg.rank() as f64, pg.world_size() as f64);
    let dev = pg.device();
    for owners in [None, Some(vec![0, pg.world_size() - 1])] {
        let a = Tensor::ones([300_000], (Kind::Float, dev)).set_requires_grad(true);
        let b = Tensor::linspace(-1.0, 1.0, 1000, (Kind::Float, dev)).set_requires_grad(true);
        let options = ReducerOptions {
            bucket_bytes: 4096,
            bucket_views: true,
            owners: owners.clone(),
            ..Default::default()
        };
        let reducer = GradReducer::new(pg, [&a, &b], &options).unwrap();
        let keeps = |i: usize| owners.as_ref().is_none_or(|o| o[i] == pg.rank());
        for step in 0..3 {
            for v in [&a, &b] {
                let g = v.grad();
                if g.defined() {
                    let _ = g.shallow_clone().zero_();
                }
            }
            reducer.arm(true).unwrap();
            let passes = if owners.is_some() { 2 } else { 1 };
            for _ in 0..passes {
                let loss = ((&a * (rank + 1.0)).sum(Kind::Float) + (&b * &b).sum(Kind::Float))
                    * (rank + 1.0);
                // (Sharded, the first step's buckets follow the graph.)
                reducer.expect_gradients_of(&loss).unwrap();
                loss.backward();
            }
            let reduced = reducer.wait().unwrap();
            reducer.finish(true).unwrap();
            assert!(!reduced.late, "{reduced:?}");
            if step > 0 {
                assert_eq!(reduced.started_in_backward, reduced.buckets, "{reduced:?}");
            }
            // Means over ranks of (r + 1)² and 2b(r + 1).
            let mean_sq: f64 = (0..world as usize)
                .map(|r| ((r + 1) * (r + 1)) as f64)
                .sum::<f64>()
                / world;
            let want_a = Tensor::full([300_000], mean_sq * passes as f64, (Kind::Float, dev));
            let want_b = &b.detach() * ((world + 1.0) * passes as f64);
            for (i, (v, want)) in [(&a, want_a), (&b, want_b)].into_iter().enumerate() {
                if keeps(i) {
                    assert!(
                        v.grad().allclose(&want, 1e-6, 1e-6, false),
                        "step {step}, owners {owners:?}: variable {i}"
                    );
                } else {
                    assert!(!v.grad().defined(), "step {step}: rank {rank} dropped {i}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nccl_collectives_on_one_gpu() {
    let env = single_process();
    let pg = ProcessGroup::nccl(&env, Duration::from_secs(60), 0).unwrap();
    check_collectives(&pg);
}

#[test]
#[ignore = "a rank of nccl_collectives_on_two_gpus"]
fn nccl_worker() {
    if std::env::var("UNCLIP_DIST_WORKER").is_err() {
        return;
    }
    let env = DistEnv::from_env().unwrap().expect("launched with RANK");
    let pg = ProcessGroup::nccl(&env, Duration::from_secs(60), env.local_rank).unwrap();
    check_collectives(&pg);
}

#[test]
#[ignore = "needs two CUDA GPUs"]
fn nccl_collectives_on_two_gpus() {
    let exe = std::env::current_exe().unwrap();
    let args = ["--exact", "nccl_worker", "--include-ignored", "--nocapture"];
    let results = launch_local(
        &exe,
        &args,
        2,
        &[("UNCLIP_DIST_WORKER", "1")],
        Duration::from_secs(120),
    )
    .expect("a rank hangs");
    for r in results {
        assert!(
            r.success && r.output.contains(&format!("rank {} ok", r.rank)),
            "rank {} failed:\n{}",
            r.rank,
            r.output
        );
    }
}
