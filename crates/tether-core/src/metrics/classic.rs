//! The classic Prometheus text format (0.0.4) from the OpenMetrics text that
//! prometheus-client writes, for scrapers that do not ask for OpenMetrics (curl,
//! `promtool check metrics`, older agents). The two differ here only in how a
//! counter family is named in its HELP and TYPE lines (`x` in OpenMetrics, `x_total`
//! in the classic format, like its samples) and in the closing `# EOF`.

use std::collections::HashSet;

/// `openmetrics` in the classic text format.
pub(crate) fn to_classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        match counter_descriptor(line, &counters) {
            Some((head, name, tail)) => {
                out.push_str(head);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A HELP or TYPE line of a counter family, split around the family's name.
fn counter_descriptor<'a>(
    line: &'a str,
    counters: &HashSet<&str>,
) -> Option<(&'a str, &'a str, &'a str)> {
    let head = ["# HELP ", "# TYPE "]
        .into_iter()
        .find(|h| line.starts_with(h))?;
    let rest = &line[head.len()..];
    let end = rest.find(' ').unwrap_or(rest.len());
    let name = &rest[..end];
    counters.contains(name).then(|| (head, name, &rest[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_like_their_samples_and_eof_goes() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
