//! The standard process metrics, read from `/proc/self` at scrape time:
//! `process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`. Where
//! `/proc` cannot be read (not Linux), the metric is left out of the scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Reads the process metrics on every scrape.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = [
            (
                "process_open_fds",
                "Number of open file descriptors",
                open_fds(),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                max_fds(),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                resident_bytes(),
            ),
        ];
        for (name, help, value) in readings {
            let Some(v) = value.and_then(|v| i64::try_from(v).ok()) else {
                continue;
            };
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)?;
        }
        Ok(())
    }
}

/// Entries in `/proc/self/fd` (the one this read opens included).
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The soft `Max open files` of `/proc/self/limits`; `None` when unlimited.
fn max_fds() -> Option<u64> {
    parse_max_fds(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_max_fds(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = rest.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_soft_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited), None);
        assert_eq!(parse_max_fds(""), None);
    }

    #[test]
    fn parses_vm_rss_in_bytes() {
        assert_eq!(
            parse_vm_rss("Name:\ttether\nVmRSS:\t   12345 kB\n"),
            Some(12345 * 1024)
        );
        assert_eq!(parse_vm_rss("Name:\ttether\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }
}
