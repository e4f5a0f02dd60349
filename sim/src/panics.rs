//! Panics inside the simulation become violations.
//!
//! A panic in a task that a host spawned is swallowed by tokio (turmoil only stops the host on it when
//! built with `--cfg tokio_unstable`). A process-wide panic hook records every panic that happens on a
//! thread while it runs a seed, and the driver turns each into a violation after the step it happened
//! in. Panics on other threads, or outside a run, go to the previous hook as usual.

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

fn install() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURED.with(|c| match c.borrow_mut().as_mut() {
                Some(panics) => {
                    panics.push(info.to_string());
                    true
                }
                None => false,
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

/// While this lives, panics on this thread are recorded (and not printed).
pub struct Capture(());

impl Capture {
    pub fn start() -> Self {
        install();
        CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
        Capture(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURED.with(|c| *c.borrow_mut() = None);
    }
}

/// The panics recorded on this thread since the last call.
pub fn take() -> Vec<String> {
    CAPTURED.with(|c| c.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default())
}
