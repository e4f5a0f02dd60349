//! The faults the driver injects and undoes: partitions, one-way links, held links, crashes,
//! latency, slow container starts, and the seeded schedule of them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::driver::{Driver, Loss};
use crate::params::SLOW_LATENCY_MS;
use crate::world::Admin;

/// A fault in force, and how to undo it.
#[derive(Debug)]
pub(crate) enum Fault {
    Partition {
        side: Vec<String>,
        rest: Vec<String>,
    },
    /// Messages from `from` to `to` are lost; the other way works.
    OneWay {
        from: Vec<String>,
        to: Vec<String>,
    },
    Hold {
        side: Vec<String>,
        rest: Vec<String>,
    },
    Crash {
        host: String,
    },
    Latency,
    SlowStarts,
    /// Not a fault: the admin instructed a switch (nothing to undo).
    Instructed,
}

impl Driver<'_> {
    pub(crate) fn pick_side(&mut self) -> (Vec<String>, Vec<String>) {
        let mut names = self.names.clone();
        names.shuffle(&mut self.rng);
        let size = self.rng.gen_range(1..=self.names.len() / 2);
        let rest = names.split_off(size);
        (names, rest)
    }

    pub(crate) fn record_links(&mut self) {
        let ms = self.sim.elapsed().as_millis() as u64;
        self.timeline.record(ms, self.links.clone());
    }

    /// Masters that `fault` cuts off from the majority: their services start a failover clock.
    pub(crate) fn note_losses(&mut self, lost_hosts: &[String]) {
        let now = self.sim.elapsed();
        for service in self.world_services() {
            let Some(p) = self.placement(&service) else { continue };
            let Some(master) = self.host_of(p.master) else { continue };
            if lost_hosts.contains(&master) && !self.losses.contains_key(&service) {
                self.losses.insert(service, Loss { at: now, master, healed: false });
            }
        }
    }

    pub(crate) fn start(&mut self, fault: Fault) -> Fault {
        self.faults += 1;
        match &fault {
            Fault::Partition { side, rest } => {
                self.partition(side, rest, true);
                let lost = side.clone();
                self.note_losses(&lost);
            }
            Fault::OneWay { from, to } => {
                for a in from {
                    for b in to {
                        self.sim.partition_oneway(a.as_str(), b.as_str());
                        self.links.cut.insert((a.clone(), b.clone()));
                    }
                }
                // A host none of whose messages get out is lost as surely as an isolated one.
                if from.len() == 1 && to.len() + 1 == self.names.len() {
                    let lost = from.clone();
                    self.note_losses(&lost);
                }
            }
            Fault::Hold { side, rest } => {
                for a in side {
                    for b in rest {
                        self.sim.hold(a.as_str(), b.as_str());
                        self.links.cut.insert((a.clone(), b.clone()));
                        self.links.cut.insert((b.clone(), a.clone()));
                    }
                }
                let lost = side.clone();
                self.note_losses(&lost);
            }
            Fault::Crash { host } => {
                self.note_losses(std::slice::from_ref(host));
                // Dropped after the crash, when its runtime is gone: dropping it earlier, from outside
                // that runtime, would wake its tasks from here.
                let node = self.world.running.lock().expect("running lock").remove(host);
                self.sim.crash(host.as_str());
                drop(node);
                self.links.down.insert(host.clone());
            }
            Fault::Latency => {
                let ms = self.rng.gen_range(50..1000);
                self.sim.set_max_message_latency(Duration::from_millis(ms));
                self.links.slow = ms > SLOW_LATENCY_MS;
                self.trace(format!("fault: latency up to {ms} ms"));
            }
            Fault::SlowStarts => {
                let ms = self.rng.gen_range(1000..3000);
                self.world.slow_start_ms.store(ms, Ordering::SeqCst);
                self.trace(format!("fault: container starts take {ms} ms more"));
            }
            Fault::Instructed => {}
        }
        self.record_links();
        if !matches!(fault, Fault::Latency | Fault::SlowStarts) {
            self.trace(format!("fault: {fault:?}"));
        }
        fault
    }

    pub(crate) fn random_fault(&mut self) -> Fault {
        match self.rng.gen_range(0..10) {
            0 => {
                let (side, rest) = self.pick_side();
                Fault::Partition { side, rest }
            }
            1 => {
                let (side, rest) = match self.leader_host() {
                    Some(leader) => self.isolate(&leader),
                    None => self.pick_side(),
                };
                Fault::Partition { side, rest }
            }
            2 if self.params.crashes => {
                let host = self.names.choose(&mut self.rng).expect("nodes").clone();
                Fault::Crash { host }
            }
            2 | 3 => {
                let (side, rest) = self.pick_side();
                Fault::Hold { side, rest }
            }
            4 => Fault::Latency,
            5 => {
                let (from, to) = self.pick_side();
                Fault::OneWay { from, to }
            }
            6 | 7 => {
                // Isolate the master of a service (in one of two ways).
                let service = format!("svc{}", self.rng.gen_range(1..=self.params.services.max(1)));
                let master = self.placement(&service).and_then(|p| self.host_of(p.master));
                let (side, rest) = match master {
                    Some(master) => self.isolate(&master),
                    None => self.pick_side(),
                };
                if self.rng.gen_bool(0.5) {
                    Fault::Partition { side, rest }
                } else {
                    // Only the master's outgoing messages are lost.
                    Fault::OneWay { from: side, to: rest }
                }
            }
            8 => Fault::SlowStarts,
            _ => {
                // The admin switches a service to one of its backups or its failover.
                let service = format!("svc{}", self.rng.gen_range(1..=self.params.services.max(1)));
                let candidates: Vec<u64> =
                    self.placement(&service).map(|p| p.nodes().skip(1).collect()).unwrap_or_default();
                let via = self.running_hosts();
                if let (Some(to), Some(via)) = (candidates.choose(&mut self.rng), via.choose(&mut self.rng)) {
                    let (to, via) = (*to, via.clone());
                    self.admin(&via, Admin::Switch { service, to });
                }
                Fault::Instructed
            }
        }
    }

    pub(crate) fn isolate(&self, host: &str) -> (Vec<String>, Vec<String>) {
        let rest = self.names.iter().filter(|n| *n != host).cloned().collect();
        (vec![host.to_string()], rest)
    }

    pub(crate) fn partition(&mut self, side: &[String], rest: &[String], cut: bool) {
        for a in side {
            for b in rest {
                if cut {
                    self.sim.partition(a.as_str(), b.as_str());
                    self.links.cut.insert((a.clone(), b.clone()));
                    self.links.cut.insert((b.clone(), a.clone()));
                } else {
                    self.sim.repair(a.as_str(), b.as_str());
                    self.links.cut.remove(&(a.clone(), b.clone()));
                    self.links.cut.remove(&(b.clone(), a.clone()));
                }
            }
        }
    }

    pub(crate) fn end(&mut self, fault: Fault) {
        self.trace(format!("heal: {fault:?}"));
        match fault {
            Fault::Partition { side, rest } => self.partition(&side, &rest, false),
            Fault::OneWay { from, to } => {
                for a in &from {
                    for b in &to {
                        self.sim.repair_oneway(a.as_str(), b.as_str());
                        self.links.cut.remove(&(a.clone(), b.clone()));
                    }
                }
            }
            Fault::Hold { side, rest } => {
                for a in &side {
                    for b in &rest {
                        self.sim.release(a.as_str(), b.as_str());
                        self.links.cut.remove(&(a.clone(), b.clone()));
                        self.links.cut.remove(&(b.clone(), a.clone()));
                    }
                }
            }
            Fault::Crash { host } => {
                self.sim.bounce(host.as_str());
                self.links.down.remove(&host);
            }
            Fault::Latency => {
                self.sim.set_max_message_latency(self.params.latency_max);
                self.links.slow = false;
            }
            Fault::SlowStarts => self.world.slow_start_ms.store(0, Ordering::SeqCst),
            Fault::Instructed => {}
        }
        for loss in self.losses.values_mut() {
            loss.healed = true;
        }
        self.record_links();
    }

    pub(crate) fn faults(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.faults;
        let mut active: Option<(Fault, Duration)> = None;
        let mut next_fault = self.sim.elapsed() + Duration::from_millis(self.rng.gen_range(200..2000));
        while self.sim.elapsed() < end {
            let now = self.sim.elapsed();
            match active.take() {
                Some((fault, until)) if now >= until => {
                    self.end(fault);
                    next_fault = now + Duration::from_millis(self.rng.gen_range(200..3000));
                }
                Some(still) => active = Some(still),
                None if now >= next_fault => {
                    let fault = self.random_fault();
                    let fault = self.start(fault);
                    let until = now + Duration::from_millis(self.rng.gen_range(500..6000));
                    active = Some((fault, until));
                }
                None => {}
            }
            if !self.step() {
                return false;
            }
        }
        if let Some((fault, _)) = active {
            self.end(fault);
        }
        true
    }
}
