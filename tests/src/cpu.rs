//! CPU accounting from `/proc`, for the benchmarks: how much CPU the measured processes, the load
//! generator and everything else on the machine used.

use std::path::Path;

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU time (user and system) of the process whose `/proc/PID/stat` is at `stat`, in seconds.
pub fn of_process(stat: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else { return 0.0 };
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let Some((_, rest)) = text.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, that is 11 and 12 after the state (field 3).
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    ticks as f64 / ticks_per_second()
}

/// Busy CPU time of the whole machine (all cores, everything but idle and I/O wait), in seconds.
pub fn of_machine() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let busy: u64 =
        ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy as f64 / ticks_per_second()
}

/// CPU seconds used so far by every running process whose command line contains `needle` (a node's
/// data directory, say).
pub fn of_cmdline(needle: &Path) -> f64 {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .map(|p| of_process(&p.path().join("stat")))
        .sum()
}
