//! String, host and path matching as Istio defines it for AuthorizationPolicy.

use std::fmt;

/// Istio's string match: `abc` exact, `abc*` prefix, `*abc` suffix, `*` presence (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    pub(crate) fn parse(pattern: &str) -> StrMatch {
        if pattern == "*" {
            StrMatch::Presence
        } else if let Some(rest) = pattern.strip_prefix('*') {
            StrMatch::Suffix(rest.into())
        } else if let Some(rest) = pattern.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else {
            StrMatch::Exact(pattern.into())
        }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == &**s,
            StrMatch::Prefix(s) => value.starts_with(&**s),
            StrMatch::Suffix(s) => value.ends_with(&**s),
            StrMatch::Presence => !value.is_empty(),
        }
    }

    /// Case-insensitive form, for hosts.
    pub(crate) fn matches_ignore_case(&self, value: &str) -> bool {
        fn starts(value: &str, prefix: &str) -> bool {
            value.len() >= prefix.len()
                && value.is_char_boundary(prefix.len())
                && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        }
        fn ends(value: &str, suffix: &str) -> bool {
            value.len() >= suffix.len()
                && value.is_char_boundary(value.len() - suffix.len())
                && value[value.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StrMatch::Prefix(s) => starts(value, s),
            StrMatch::Suffix(s) => ends(value, s),
            StrMatch::Presence => !value.is_empty(),
        }
    }
}

impl fmt::Display for StrMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrMatch::Exact(s) => write!(f, "{s}"),
            StrMatch::Prefix(s) => write!(f, "{s}*"),
            StrMatch::Suffix(s) => write!(f, "*{s}"),
            StrMatch::Presence => f.write_str("*"),
        }
    }
}

/// A `paths` entry: a plain string match, or a path template with `{*}` (exactly one non-empty path
/// segment) and `{**}` (anything, slashes included), as Istio supports since 1.22 (Envoy URI templates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Plain(StrMatch),
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TemplatePart {
    Literal(Box<str>),
    /// `{*}`: one whole path segment, at least one character.
    Segment,
    /// `{**}`: the rest of the path up to the trailing literal; always the last operator.
    Rest,
}

impl PathMatch {
    /// Parses a pattern; templates must follow Istio's rules (an operator is a whole segment, `{**}` is the
    /// last operator, no `*`, `{` or `}` elsewhere). The `Err` is the reason, for validation messages.
    pub(crate) fn parse(pattern: &str) -> Result<PathMatch, String> {
        if !pattern.contains(['{', '}']) {
            return Ok(PathMatch::Plain(StrMatch::parse(pattern)));
        }
        let invalid = |why: &str| Err(format!("{pattern:?} is not a valid path template: {why}"));
        if !pattern.starts_with('/') {
            return invalid("it must start with /");
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut seen_rest = false;
        for (i, segment) in pattern.split('/').enumerate() {
            if i > 0 {
                literal.push('/');
            }
            match segment {
                "{*}" | "{**}" => {
                    if seen_rest {
                        return invalid("{**} must be the last operator");
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Literal(std::mem::take(&mut literal).into()));
                    }
                    seen_rest = segment == "{**}";
                    parts.push(if seen_rest {
                        TemplatePart::Rest
                    } else {
                        TemplatePart::Segment
                    });
                }
                s if s.contains(['*', '{', '}']) => {
                    return invalid(
                        "an operator must be a whole path segment, and * is only allowed inside one",
                    );
                }
                s => literal.push_str(s),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(literal.into()));
        }
        Ok(PathMatch::Template(parts))
    }

    /// Linear in the path's length: a `{*}` takes exactly the segment it stands in, and after `{**}` only
    /// a literal can follow, which must end the path.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let parts = match self {
            PathMatch::Plain(m) => return m.matches(path),
            PathMatch::Template(parts) => parts,
        };
        let mut rest = path;
        for (i, part) in parts.iter().enumerate() {
            match part {
                TemplatePart::Literal(l) => match rest.strip_prefix(&**l) {
                    Some(after) => rest = after,
                    None => return false,
                },
                TemplatePart::Segment => {
                    let end = rest.find('/').unwrap_or(rest.len());
                    if end == 0 {
                        return false;
                    }
                    rest = &rest[end..];
                }
                TemplatePart::Rest => {
                    return match parts.get(i + 1) {
                        Some(TemplatePart::Literal(tail)) => rest.ends_with(&**tail),
                        _ => true,
                    };
                }
            }
        }
        rest.is_empty()
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Plain(m) => m.fmt(f),
            PathMatch::Template(parts) => parts.iter().try_for_each(|part| match part {
                TemplatePart::Literal(l) => f.write_str(l),
                TemplatePart::Segment => f.write_str("{*}"),
                TemplatePart::Rest => f.write_str("{**}"),
            }),
        }
    }
}

/// A host pattern. Matching ignores ASCII case, and a pattern without a port also matches the request host
/// with any port (`example.com` matches `example.com:8080`), as Istio does since a port in the Host header
/// could otherwise slip past a DENY rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostMatch {
    pattern: StrMatch,
    pattern_has_port: bool,
}

impl HostMatch {
    pub(crate) fn parse(pattern: &str) -> HostMatch {
        HostMatch {
            pattern: StrMatch::parse(pattern),
            pattern_has_port: host_port_split(pattern).1.is_some(),
        }
    }

    pub(crate) fn matches(&self, host: &str) -> bool {
        if self.pattern.matches_ignore_case(host) {
            return true;
        }
        !self.pattern_has_port
            && host_port_split(host).1.is_some()
            && self.pattern.matches_ignore_case(host_port_split(host).0)
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pattern.fmt(f)
    }
}

/// Splits `host:port` (or `[v6]:port`); a bare IPv6 address has no port.
fn host_port_split(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.rsplit_once("]:") {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() => {
                (&host[..h.len() + 1], Some(port))
            }
            _ => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((h, port))
            if !h.contains(':') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (h, Some(port))
        }
        _ => (host, None),
    }
}

/// How request paths are normalized before matching `paths` / `notPaths`, as Istio's mesh config
/// `pathNormalization` names the choices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PathNormalization {
    /// RFC 3986 normalization: percent-decode unreserved characters, upper-case the remaining escapes,
    /// resolve `.` and `..` segments, turn `\` into `/`. `%2F` and `%5C` stay encoded. Istio's default.
    #[default]
    Base,
    /// `Base`, then collapse repeated slashes.
    MergeSlashes,
    /// Also decode `%2F` and `%5C` into `/` (before resolving dot segments), then collapse slashes. For
    /// backends that decode encoded slashes themselves.
    DecodeAndMergeSlashes,
}

/// Normalizes a request path (`:path`, query and fragment are dropped) for authorization matching.
pub fn normalize_path(raw: &str, mode: PathNormalization) -> String {
    let path = raw.split(['?', '#']).next().unwrap_or_default().as_bytes();
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    // Unreserved characters (and, when asked, slashes) are decoded; other escapes are kept with upper-case
    // hex so `%2f` and `%2F` compare equal; `\` is a separator as it is to many backends.
    let mut decoded = Vec::with_capacity(path.len() + 1);
    let mut i = 0;
    while i < path.len() {
        let escaped = (path[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(value) => {
                let unreserved = value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~');
                if unreserved || (decode_slashes && matches!(value, b'/' | b'\\')) {
                    decoded.push(if value == b'\\' { b'/' } else { value });
                } else {
                    decoded.push(b'%');
                    decoded.extend(path[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
                }
                i += 3;
            }
            None => {
                decoded.push(if path[i] == b'\\' { b'/' } else { path[i] });
                i += 1;
            }
        }
    }
    // Only ASCII was decoded, so valid UTF-8 input stays valid.
    let decoded = String::from_utf8_lossy(&decoded);
    let mut path = remove_dot_segments(&decoded);
    if mode != PathNormalization::Base {
        let mut merged = String::with_capacity(path.len());
        for c in path.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        path = merged;
    }
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    path
}

/// RFC 3986 section 5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let ends_with_slash =
        path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..") || path == "." || path == "..";
    for segment in path.split('/') {
        match segment {
            "." => {}
            ".." => {
                // Never climb above the root: `/../x` is `/x`.
                if output.len() > 1 {
                    output.pop();
                }
            }
            s => output.push(s),
        }
    }
    let mut result = output.join("/");
    if ends_with_slash && !result.ends_with('/') {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("abc", "abc", true ; "exact")]
    #[test_case("abc", "abcd", false ; "exact is not prefix")]
    #[test_case("abc*", "abcd", true ; "prefix")]
    #[test_case("*abc", "xabc", true ; "suffix")]
    #[test_case("*", "x", true ; "presence")]
    #[test_case("*", "", false ; "presence needs a value")]
    fn string_match(pattern: &str, value: &str, expected: bool) {
        assert_eq!(StrMatch::parse(pattern).matches(value), expected);
    }

    #[test_case("example.com", "EXAMPLE.com", true ; "case insensitive")]
    #[test_case("example.com", "example.com:8080", true ; "port ignored when pattern has none")]
    #[test_case("example.com:80", "example.com:8080", false ; "explicit port must match")]
    #[test_case("*.example.com", "api.Example.COM:443", true ; "suffix with port")]
    #[test_case("example.com", "example.com.evil", false ; "no suffix tricks")]
    #[test_case("[::1]", "[::1]:80", true ; "ipv6 with port")]
    fn host_match(pattern: &str, host: &str, expected: bool) {
        assert_eq!(HostMatch::parse(pattern).matches(host), expected);
    }

    // istio.io AuthorizationPolicy reference, Operation.paths: the path template examples.
    #[test_case("/foo/{*}", "/foo/bar", true ; "one segment")]
    #[test_case("/foo/{*}", "/foo/bar/baz", false ; "one segment does not extend")]
    #[test_case("/foo/{*}", "/foo/", false ; "one segment is not empty")]
    #[test_case("/foo/{**}", "/foo/bar/baz", true ; "rest")]
    #[test_case("/foo/{**}", "/foo/", true ; "rest may be empty")]
    #[test_case("/foo/{**}", "/foobar", false ; "rest needs the slash")]
    #[test_case("/foo/{**}/", "/foo/bar/", true ; "rest then trailing slash")]
    #[test_case("/foo/{**}/", "/foo/bar", false ; "trailing slash required")]
    #[test_case("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true ; "mixed empty rest")]
    #[test_case("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true ; "mixed")]
    #[test_case("/foo/{*}/bar/{**}", "/foo/buzz/qux/baz", false ; "mixed literal mismatch")]
    fn path_templates(template: &str, path: &str, expected: bool) {
        assert_eq!(PathMatch::parse(template).unwrap().matches(path), expected);
    }

    #[test_case("/*/baz/{*}" ; "star outside an operator")]
    #[test_case("/**/baz/{*}" ; "double star outside an operator")]
    #[test_case("/{**}/foo/{*}" ; "rest not last")]
    #[test_case("/foo/{*}.txt" ; "operator not a whole segment")]
    #[test_case("foo/{*}" ; "relative")]
    fn invalid_path_templates(template: &str) {
        assert!(PathMatch::parse(template).is_err(), "{template}");
    }

    #[test]
    fn templates_match_long_paths_in_linear_time() {
        let template = PathMatch::parse("/a/{*}/{**}/end").unwrap();
        let long = format!("/a/x/{}/end", "y/".repeat(100_000));
        assert!(template.matches(&long));
        assert!(!template.matches(&long[..long.len() - 1]));
    }

    #[test_case("/a/b/../c", PathNormalization::Base, "/a/c" ; "dot dot")]
    #[test_case("/a/./b", PathNormalization::Base, "/a/b" ; "dot")]
    #[test_case("/../../etc/passwd", PathNormalization::Base, "/etc/passwd" ; "cannot climb above root")]
    #[test_case("/a/%2e%2e/admin", PathNormalization::Base, "/admin" ; "encoded dots decoded first")]
    #[test_case("/%61dmin", PathNormalization::Base, "/admin" ; "unreserved decoded")]
    #[test_case("/admin%2fx", PathNormalization::Base, "/admin%2Fx" ; "encoded slash kept upper case")]
    #[test_case("/admin%2fx", PathNormalization::DecodeAndMergeSlashes, "/admin/x" ; "encoded slash decoded")]
    #[test_case("/a//b", PathNormalization::Base, "/a//b" ; "base keeps double slash")]
    #[test_case("/a//b", PathNormalization::MergeSlashes, "/a/b" ; "merge slashes")]
    #[test_case("/a\\..\\admin", PathNormalization::Base, "/admin" ; "backslash is a separator")]
    #[test_case("/a?x=/../b#f", PathNormalization::Base, "/a" ; "query and fragment dropped")]
    #[test_case("/a/", PathNormalization::Base, "/a/" ; "trailing slash kept")]
    #[test_case("/%zz", PathNormalization::Base, "/%zz" ; "bad escape kept")]
    #[test_case("/caf%C3%A9", PathNormalization::Base, "/caf%C3%A9" ; "non ascii escape kept")]
    #[test_case("", PathNormalization::Base, "/" ; "empty")]
    fn path_normalization(raw: &str, mode: PathNormalization, expected: &str) {
        assert_eq!(normalize_path(raw, mode), expected);
    }
}
