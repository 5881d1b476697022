//! The CPU time of another process (the broker under test), from `/proc/PID/stat`.
//!
//! `utime` and `stime` (fields 14 and 15) count every thread of the process, in clock ticks
//! of `USER_HZ`. Linux fixes `USER_HZ` at 100 in its user-space ABI on every architecture
//! Rust's Linux targets use, whatever the kernel's internal tick rate, so the resolution is
//! 10 ms: plenty over a window of seconds.

use anyhow::{bail, Context};

/// Clock ticks per second in `/proc/PID/stat` (Linux's `USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU time of process `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (is process {pid} running?)"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// `utime + stime` from the text of a `/proc/PID/stat` file.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // Field 2, the command name, is in parentheses and may itself hold spaces and
    // parentheses; the fields after the *last* ')' are plain numbers and letters.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no ')' after the command name");
    };
    // `rest` starts at field 3 (the state): utime is field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| -> anyhow::Result<u64> {
        let text = fields
            .get(number - 3)
            .with_context(|| format!("field {number} missing"))?;
        text.parse()
            .with_context(|| format!("field {number} is {text:?}, not a number"))
    };
    Ok(field(14)? + field(15)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_plus_stime_past_an_awkward_command_name() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194304 2270 0 0 0 \
                    1234 567 0 0 20 0 9 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat).expect("parses"), 1234 + 567);
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        assert!(parse_cpu_ticks("4242 (meridian) S 1 2 3").is_err());
        assert!(parse_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn reads_this_process() {
        let seconds = cpu_seconds(std::process::id()).expect("own stat");
        assert!(seconds >= 0.0);
    }
}
