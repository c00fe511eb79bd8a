//! Stopping on request: SIGTERM (what SLURM, Kubernetes and torchrun send before they kill a
//! job), SIGUSR1 (SLURM's `--signal=USR1@120` warning) and SIGINT (Ctrl-C) make the training loop
//! finish its step, write a checkpoint and return, so a preempted job loses nothing. A second
//! Ctrl-C ends the process at once.

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const SIGNALS: [(i32, &str); 3] = [
    (SIGTERM, "SIGTERM"),
    (SIGUSR1, "SIGUSR1"),
    (SIGINT, "SIGINT"),
];

/// One flag per signal, set by its handler.
fn flags() -> &'static [(Arc<AtomicBool>, &'static str); 3] {
    static FLAGS: OnceLock<[(Arc<AtomicBool>, &'static str); 3]> = OnceLock::new();
    FLAGS.get_or_init(|| SIGNALS.map(|(_, name)| (Arc::new(AtomicBool::new(false)), name)))
}

/// True while no run trains: the signals then act as they would without these handlers.
fn disarmed() -> &'static Arc<AtomicBool> {
    static DISARMED: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    DISARMED.get_or_init(|| Arc::new(AtomicBool::new(true)))
}

/// Armed handlers for a training run; dropped, the signals act as before again (a single Ctrl-C
/// ends a finished run's report or sampling). signal-hook's handlers cannot be removed without
/// leaving the signals ignored, so they stay installed and emulate the default action when
/// disarmed.
pub struct Handlers(());

impl Drop for Handlers {
    fn drop(&mut self) {
        disarmed().store(true, Ordering::SeqCst);
    }
}

/// Installs the handlers (once per process) and arms them, with every flag cleared, until the
/// returned guard is dropped.
pub fn install() -> std::io::Result<Handlers> {
    // Under a lock: two runs starting at once must not register the handlers twice.
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !*installed {
        for ((signal, _), (flag, _)) in SIGNALS.iter().zip(flags()) {
            // In registration order: disarmed, the default action; a second Ctrl-C while the
            // first is pending, an exit as Ctrl-C's; otherwise the flag.
            signal_hook::flag::register_conditional_default(*signal, disarmed().clone())?;
            if *signal == SIGINT {
                signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
            }
            signal_hook::flag::register(*signal, flag.clone())?;
        }
        *installed = true;
    }
    for (flag, _) in flags() {
        flag.store(false, Ordering::SeqCst);
    }
    disarmed().store(false, Ordering::SeqCst);
    Ok(Handlers(()))
}

/// The signal that asked the run to stop, if one has.
pub fn requested() -> Option<&'static str> {
    flags()
        .iter()
        .find(|(flag, _)| flag.load(Ordering::SeqCst))
        .map(|(_, name)| *name)
}

/// What a rank reports to the others: 1.0 when it was asked to stop.
pub fn as_flag() -> f64 {
    if requested().is_some() {
        1.0
    } else {
        0.0
    }
}
