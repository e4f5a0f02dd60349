//! Image pulls: a missing image is pulled in the background (one task per image, at most
//! [`PULLS_MAX`] at a time), never inside a pass. A failed pull is retried with backoff, and until
//! then the image is reported missing, so a server without a registry gets a clear alarm, not a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::executor::backoff_delay;
use crate::runtime::ContainerRuntime;

/// A failed pull is retried after this, doubling up to [`PULL_BACKOFF_MAX`].
pub const PULL_BACKOFF_MIN: Duration = Duration::from_secs(30);
pub const PULL_BACKOFF_MAX: Duration = Duration::from_secs(1800);
/// Image pulls in flight at once.
pub const PULLS_MAX: usize = 2;

#[derive(Clone, Debug)]
enum PullState {
    Running,
    Failed { error: String, failures: u32, retry_at: Instant },
}

/// The pulls of one executor: in flight or failed, by image.
pub(super) struct Pulls {
    /// Pull missing images (else only report them).
    enabled: bool,
    runtime: Arc<dyn ContainerRuntime>,
    /// Pulls in flight or failed, by image. A std mutex: never held across an await.
    pulls: Arc<Mutex<HashMap<String, PullState>>>,
    /// Notified when a pull ends, so the next pass need not wait for the timer.
    wake: Arc<Notify>,
}

impl Pulls {
    pub(super) fn new(runtime: Arc<dyn ContainerRuntime>, enabled: bool) -> Self {
        Pulls { enabled, runtime, pulls: Default::default(), wake: Arc::new(Notify::new()) }
    }

    /// Resolves when a pull ends (succeeded or failed).
    pub(super) fn ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// The alarm message for a missing image, or `None` while a pull may still bring it. Starts a pull
    /// in the background when one is due.
    pub(super) fn image_missing(&self, image: &str, now: Instant) -> Option<String> {
        if !self.enabled {
            return Some(format!(
                "image {image} is not on this server and pulling is off; build or load it (docker load) and it will be used"
            ));
        }
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let failures = match pulls.get(image) {
            Some(PullState::Running) => return None,
            Some(PullState::Failed { error, retry_at, .. }) if now < *retry_at => {
                return Some(format!(
                    "image {image} is not on this server and could not be pulled ({error}); build or load it (docker load) and it will be used"
                ));
            }
            Some(PullState::Failed { failures, .. }) => *failures,
            None => 0,
        };
        let running = pulls.values().filter(|p| matches!(p, PullState::Running)).count();
        if running >= PULLS_MAX {
            return None;
        }
        pulls.insert(image.to_string(), PullState::Running);
        let (runtime, all, wake, image) =
            (self.runtime.clone(), self.pulls.clone(), self.wake.clone(), image.to_string());
        tokio::spawn(async move {
            let result = runtime.pull(&image).await;
            let mut pulls = all.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    pulls.remove(&image);
                }
                Err(e) => {
                    tracing::warn!(image, "pull failed: {e}");
                    let failures = failures + 1;
                    let retry_at =
                        Instant::now() + backoff_delay(failures, PULL_BACKOFF_MIN, PULL_BACKOFF_MAX);
                    pulls.insert(image, PullState::Failed { error: e.to_string(), failures, retry_at });
                }
            }
            drop(pulls);
            wake.notify_one();
        });
        None
    }
}
