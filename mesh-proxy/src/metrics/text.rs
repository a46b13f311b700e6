//! Prometheus text exposition format 0.0.4, written by hand: `# HELP`, `# TYPE`, then one line per sample.
//!
//! Hand-written rather than `prometheus-client` because the traffic families are read from live connection
//! records at scrape time (a registry of atomic counters would need a second copy of every byte count), and
//! the format is small enough that owning it costs less than fitting the data into another crate's model.

use std::fmt::Write;

/// The `Content-Type` of a scrape response in this format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (resets on restart); its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        }
    }
}

/// A sample value: integers print exactly, floats in the format's spelling (`NaN`, `+Inf`, `-Inf`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value {
    Int(u64),
    Float(f64),
}

/// Appends a family's `# HELP` and `# TYPE` lines.
pub(crate) fn write_header(out: &mut String, name: &str, help: &str, kind: MetricKind) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    escape_help(out, help);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind.as_str());
    out.push('\n');
}

/// Appends one sample line: `name{label="value",...} value`.
pub(crate) fn write_sample<'a>(
    out: &mut String,
    name: &str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    value: Value,
) {
    out.push_str(name);
    let mut first = true;
    for (label, label_value) in labels {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(label);
        out.push_str("=\"");
        escape_label_value(out, label_value);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    write_value(out, value);
    out.push('\n');
}

fn write_value(out: &mut String, value: Value) {
    match value {
        Value::Int(v) => {
            // Writing to a String cannot fail.
            let _ = write!(out, "{v}");
        }
        Value::Float(v) if v.is_nan() => out.push_str("NaN"),
        Value::Float(v) if v == f64::INFINITY => out.push_str("+Inf"),
        Value::Float(v) if v == f64::NEG_INFINITY => out.push_str("-Inf"),
        Value::Float(v) => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Label values escape backslash, double quote and line feed; everything else is literal UTF-8.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Help text escapes backslash and line feed (a double quote is literal there).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Whether `name` is a valid metric name, `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub(crate) fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid label name, `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with the reserved `__`.
pub(crate) fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use test_case::test_case;

    use super::*;

    #[test]
    fn header_and_samples() {
        let mut out = String::new();
        write_header(
            &mut out,
            "istio_tcp_connections_opened_total",
            "Opened \\ ok\nnext",
            MetricKind::Counter,
        );
        write_sample(
            &mut out,
            "istio_tcp_connections_opened_total",
            [("a", "1"), ("b", "x")],
            Value::Int(7),
        );
        write_sample(&mut out, "process_open_fds", [], Value::Float(12.0));
        assert_eq!(
            out,
            "# HELP istio_tcp_connections_opened_total Opened \\\\ ok\\nnext\n\
             # TYPE istio_tcp_connections_opened_total counter\n\
             istio_tcp_connections_opened_total{a=\"1\",b=\"x\"} 7\n\
             process_open_fds 12\n"
        );
    }

    #[test_case("plain", "plain"; "plain")]
    #[test_case("say \"hi\"", "say \\\"hi\\\""; "quotes")]
    #[test_case("a\nb", "a\\nb"; "line feed")]
    #[test_case("c:\\dir", "c:\\\\dir"; "backslash")]
    #[test_case("\\\"\n", "\\\\\\\"\\n"; "all three")]
    #[test_case("héllo\tx", "héllo\tx"; "other characters are literal")]
    fn label_values_are_escaped(raw: &str, escaped: &str) {
        let mut out = String::new();
        write_sample(&mut out, "m", [("l", raw)], Value::Int(1));
        assert_eq!(out, format!("m{{l=\"{escaped}\"}} 1\n"));
    }

    #[test_case(Value::Int(0), "0")]
    #[test_case(Value::Int(u64::MAX), "18446744073709551615")]
    #[test_case(Value::Float(0.5), "0.5")]
    #[test_case(Value::Float(3.0), "3")]
    #[test_case(Value::Float(f64::NAN), "NaN")]
    #[test_case(Value::Float(f64::INFINITY), "+Inf")]
    #[test_case(Value::Float(f64::NEG_INFINITY), "-Inf")]
    #[test_case(Value::Float(-2.25), "-2.25")]
    fn values(value: Value, text: &str) {
        let mut out = String::new();
        write_value(&mut out, value);
        assert_eq!(out, text);
    }

    #[test_case("istio_xds_connected", true)]
    #[test_case("a:b_c9", true)]
    #[test_case("_x", true)]
    #[test_case("9lives", false)]
    #[test_case("", false)]
    #[test_case("has-dash", false)]
    #[test_case("sp ace", false)]
    #[test_case("ünï", false)]
    fn metric_names(name: &str, valid: bool) {
        assert_eq!(is_metric_name(name), valid);
    }

    #[test_case("url", true)]
    #[test_case("type_url2", true)]
    #[test_case("__reserved", false)]
    #[test_case("a:b", false)]
    #[test_case("", false)]
    #[test_case("1a", false)]
    fn label_names(name: &str, valid: bool) {
        assert_eq!(is_label_name(name), valid);
    }
}
