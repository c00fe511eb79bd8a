//! Two real processes on loopback: this test binary re-runs itself as rank 0 and rank 1.
use std::time::Duration;
use tch::{Kind, Tensor};
use unclip_dist::launch::launch_local;
use unclip_dist::{DistEnv, ProcessGroup};

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
    let results = launch("collectives_worker", 2);
    for (rank, (ok, out)) in results.iter().enumerate() {
        assert!(
            *ok && out.contains(&format!("rank {rank} ok")),
            "rank {rank} failed:\n{out}"
        );
    }
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
