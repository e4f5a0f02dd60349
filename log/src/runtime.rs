//! openraft's async runtime: a copy of openraft 0.9.25's `TokioRuntime` whose random number generator
//! can be seeded.
//!
//! openraft draws every election timeout from [`AsyncRuntime::thread_rng`]. Its own tokio runtime
//! answers with `rand::thread_rng()`, seeded from the operating system, so two runs of the same
//! simulation would time out at different instants and elect different leaders. This runtime answers
//! with [`RuntimeRng`], which draws from a thread-local generator: unseeded (the default, and always in
//! production) it is `rand::thread_rng()`; after [`seed_thread_rng`] it is a `StdRng` from that seed.
//! The simulator runs all its hosts on one thread, seeds it before each run, and so gets the same
//! timeouts in the same order every time. Everything else is tokio's, exactly as in openraft.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::{AsyncOneshotSendExt, AsyncRuntime};
use openraft::{OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// From now on, [`RuntimeRng`] on this thread draws from a generator seeded with `seed`.
pub fn seed_thread_rng(seed: u64) {
    SEEDED.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Back to `rand::thread_rng()` on this thread.
pub fn unseed_thread_rng() {
    SEEDED.with(|rng| *rng.borrow_mut() = None);
}

/// The random source openraft gets: this thread's seeded generator if there is one, else
/// `rand::thread_rng()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RuntimeRng;

impl RuntimeRng {
    fn with<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        SEEDED.with(|seeded| match seeded.borrow_mut().as_mut() {
            Some(rng) => f(rng),
            None => f(&mut rand::thread_rng()),
        })
    }
}

impl RngCore for RuntimeRng {
    fn next_u32(&mut self) -> u32 {
        Self::with(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        Self::with(|rng| rng.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        Self::with(|rng| rng.fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        Self::with(|rng| rng.try_fill_bytes(dest))
    }
}

/// openraft's `TokioRuntime` with [`RuntimeRng`] as its random source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CoyoteRuntime;

/// A tokio `oneshot` sender, as openraft's runtime needs it.
pub struct OneshotSender<T>(tokio::sync::oneshot::Sender<T>);

impl<T: OptionalSend> AsyncOneshotSendExt<T> for OneshotSender<T> {
    fn send(self, t: T) -> Result<(), T> {
        self.0.send(t)
    }
}

impl<T> std::fmt::Debug for OneshotSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OneshotSender").finish()
    }
}

impl AsyncRuntime for CoyoteRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = RuntimeRng;
    type OneshotSender<T: OptionalSend> = OneshotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        RuntimeRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (OneshotSender(tx), rx)
    }
}
