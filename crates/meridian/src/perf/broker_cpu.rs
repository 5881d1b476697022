//! What the kernel counts for another process (the broker under test): CPU time, context
//! switches, read/write system calls and minor page faults, from `/proc/PID`.
//!
//! `utime` and `stime` (fields 14 and 15 of `/proc/PID/stat`) count every thread of the
//! process, in clock ticks of `USER_HZ`. Linux fixes `USER_HZ` at 100 in its user-space ABI on
//! every architecture Rust's Linux targets use, whatever the kernel's internal tick rate, so the
//! resolution is 10 ms: plenty over a window of seconds. `minflt` (field 10) counts the whole
//! process too. Context switches are per thread (`/proc/PID/task/TID/status`) and summed here,
//! so threads that exit during the window take theirs with them. `syscr` and `syscw` of
//! `/proc/PID/io` count only the read and write families (`read`, `pread64`, `readv`, `write`,
//! `pwritev`, `writev`, ...), not `recvfrom`, `fdatasync`, `futex` or `epoll_wait`; reading
//! that file needs the right to trace the process, so those two are optional.
//!
//! Over a short window (a drain of a second) the ticks are coarse, so the time each thread
//! spent on a CPU is also summed from `/proc/PID/task/TID/schedstat`, in nanoseconds: precise,
//! but, as the switches, without the threads that exited during the window (the sample keeps
//! the thread ids, so that the report can say how many did).

use anyhow::{bail, Context};

/// Clock ticks per second in `/proc/PID/stat` (Linux's `USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// The counters of one process at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerSample {
    /// User plus system CPU time so far, in seconds.
    pub cpu_seconds: f64,
    /// Time on a CPU so far of the threads alive now (`schedstat`), in seconds.
    pub running_seconds: f64,
    /// The ids of those threads.
    pub threads: Vec<u32>,
    pub minor_faults: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// `syscr` and `syscw` of `/proc/PID/io`, if readable.
    pub read_syscalls: Option<u64>,
    pub write_syscalls: Option<u64>,
}

/// Reads the counters of process `pid`.
pub fn sample(pid: u32) -> anyhow::Result<BrokerSample> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (is process {pid} running?)"))?;
    let (ticks, minor_faults) = parse_stat(&stat).with_context(|| format!("parsing {path}"))?;
    let mut sample = BrokerSample {
        cpu_seconds: ticks as f64 / TICKS_PER_SECOND,
        minor_faults,
        ..BrokerSample::default()
    };
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        // A thread that exits meanwhile has no files to read any more: it is skipped.
        let Ok(task) = task else {
            continue;
        };
        let read = |name: &str| std::fs::read_to_string(task.path().join(name));
        let (Ok(status), Ok(schedstat)) = (read("status"), read("schedstat")) else {
            continue;
        };
        sample.voluntary_switches += field_value(&status, "voluntary_ctxt_switches:").unwrap_or(0);
        sample.involuntary_switches +=
            field_value(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        // Its first field: nanoseconds on a CPU.
        let running_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
        sample.running_seconds += running_ns as f64 / 1e9;
        if let Some(id) = task.file_name().to_str().and_then(|id| id.parse().ok()) {
            sample.threads.push(id);
        }
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        sample.read_syscalls = field_value(&io, "syscr:");
        sample.write_syscalls = field_value(&io, "syscw:");
    }
    Ok(sample)
}

/// The number after `name` on its line of a `/proc` file of `name: value` lines.
fn field_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
}

/// `utime + stime` and `minflt` from the text of a `/proc/PID/stat` file.
fn parse_stat(stat: &str) -> anyhow::Result<(u64, u64)> {
    // Field 2, the command name, is in parentheses and may itself hold spaces and
    // parentheses; the fields after the *last* ')' are plain numbers and letters.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no ')' after the command name");
    };
    // `rest` starts at field 3 (the state): minflt is field 10, utime 14, stime 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| -> anyhow::Result<u64> {
        let text = fields
            .get(number - 3)
            .with_context(|| format!("field {number} missing"))?;
        text.parse()
            .with_context(|| format!("field {number} is {text:?}, not a number"))
    };
    Ok((field(14)? + field(15)?, field(10)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_plus_stime_past_an_awkward_command_name() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194304 2270 0 0 0 \
                    1234 567 0 0 20 0 9 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat(stat).expect("parses"), (1234 + 567, 2270));
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        assert!(parse_stat("4242 (meridian) S 1 2 3").is_err());
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn reads_this_process() {
        let first = sample(std::process::id()).expect("own counters");
        // Sleeping is a voluntary context switch, and this process may read its own io file.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let own = std::fs::read_to_string("/proc/thread-self/status").expect("own status");
        let own = field_value(&own, "voluntary_ctxt_switches:").expect("own switches");
        let second = sample(std::process::id()).expect("own counters");
        // The sum over the threads alive now includes this one's (it may be below the first
        // sample's: other tests' threads exit meanwhile).
        assert!(
            own > 0 && second.voluntary_switches >= own,
            "{own} {second:?}"
        );
        assert!(second.cpu_seconds >= first.cpu_seconds);
        // This thread is among those read, and has run.
        let own = std::fs::read_to_string("/proc/thread-self/stat").expect("own stat");
        let own: u32 = own
            .split_whitespace()
            .next()
            .expect("tid")
            .parse()
            .expect("tid");
        assert!(second.threads.contains(&own), "{own} {second:?}");
        assert!(second.running_seconds > 0.0, "{second:?}");
        assert!(
            second.read_syscalls > first.read_syscalls,
            "{first:?} {second:?}"
        );
    }

    #[test]
    fn reads_name_value_lines() {
        let status =
            "Name:\tmeridian\nvoluntary_ctxt_switches:\t150\nnonvoluntary_ctxt_switches:\t545\n";
        assert_eq!(field_value(status, "voluntary_ctxt_switches:"), Some(150));
        assert_eq!(
            field_value(status, "nonvoluntary_ctxt_switches:"),
            Some(545)
        );
        assert_eq!(field_value(status, "syscr:"), None);
    }
}
