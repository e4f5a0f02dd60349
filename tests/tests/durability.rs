//! kill -9 in the middle of a stream of writes, many times over: after each restart every
//! acknowledged event is still there, at the index it was acknowledged with, in order.
//!
//! Rounds: `COYOTE_DURABILITY_ROUNDS` (default 12).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use coyote_tests::{api_call, wait_until, Node};

const WRITERS: usize = 4;

#[test]
fn acknowledged_events_survive_kill_9() -> Result<()> {
    let rounds: usize =
        std::env::var("COYOTE_DURABILITY_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(12);
    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    node.up()?;
    // index -> expected start of the event's summary, for every acknowledged write of every round
    let acknowledged: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let socket = node.dir.join("coyote.sock");
    let mut total_writes = 0;

    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (stop, acknowledged, socket) = (stop.clone(), acknowledged.clone(), socket.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    let mut seq = 0u64;
                    let writer = std::thread::current().id();
                    while !stop.load(Ordering::Relaxed) {
                        // Raise an alarm, then clear it: two events, and open alarms stay bounded.
                        seq += 1;
                        let key = format!("durability-{writer:?}-{seq}").replace(['(', ')'], "");
                        let body = format!(r#"{{"key":"{key}","message":"m"}}"#);
                        let Ok((200, v)) = api_call(&socket, "POST", "/v1/alarms", &body) else {
                            break; // the node died under us: this write was not acknowledged
                        };
                        let id = v["id"].as_u64().expect("id");
                        acknowledged.lock().unwrap().insert(id, format!("alarm {key}:"));
                        n += 1;
                        let Ok((200, v)) = api_call(&socket, "POST", &format!("/v1/alarms/{id}/clear"), "")
                        else {
                            break;
                        };
                        let index = v["index"].as_u64().expect("index");
                        acknowledged.lock().unwrap().insert(index, format!("alarm {id} cleared"));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Kill at a different moment each round, while the writers are busy.
        std::thread::sleep(Duration::from_millis(150 + (round as u64 * 137) % 500));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        total_writes += written;

        node.restart()?;
        // A restarted node re-applies its log after it is elected; wait for that, boundedly.
        let last_acknowledged = acknowledged.lock().unwrap().keys().next_back().copied().unwrap_or(0);
        let applied = wait_until("the restarted node to apply its log", Duration::from_secs(30), || {
            let s = node.status()?;
            let applied = s["applied_index"].as_u64().unwrap_or(0);
            let last_event = s["last_event"].as_u64().unwrap_or(0);
            Ok((last_event >= last_acknowledged && Some(applied) >= s["last_log_index"].as_u64())
                .then_some(last_event))
        });
        if let Err(e) = applied {
            bail!("round {round}: acknowledged writes up to {last_acknowledged} never applied: {e}");
        }
        let events = node.events()?;
        let by_index: BTreeMap<u64, &serde_json::Value> =
            events.iter().map(|e| (e["index"].as_u64().unwrap(), e)).collect();
        let indexes: Vec<u64> = events.iter().map(|e| e["index"].as_u64().unwrap()).collect();
        if !indexes.windows(2).all(|w| w[0] < w[1]) {
            bail!("round {round}: events out of order: {indexes:?}");
        }
        if written == 0 {
            bail!("round {round}: no write was acknowledged before the kill");
        }
        for (index, id) in acknowledged.lock().unwrap().iter() {
            let Some(e) = by_index.get(index) else {
                bail!("round {round}: acknowledged event {index} ({id}) is lost after kill -9");
            };
            let summary = e["summary"].as_str().unwrap_or("");
            if e["outcome"] != "applied" || !summary.starts_with(id.as_str()) {
                bail!("round {round}: event {index} should be {id:?}, found {e}");
            }
        }
        eprintln!("round {round}: {written} writes acknowledged, {} events after restart", events.len());
    }
    eprintln!("{total_writes} acknowledged writes over {rounds} kills, none lost");
    Ok(())
}
