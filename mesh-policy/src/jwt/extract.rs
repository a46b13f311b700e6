//! Where a token is found (`fromHeaders`, `fromParams`, `fromCookies`) and how it is removed again.

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// One place a rule looks for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A header, with a prefix to strip (`Bearer `); a header without the prefix holds no token.
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// Istio's defaults when a rule names no location: `Authorization: Bearer <token>`, then the
/// `access_token` query parameter (RFC 6750 sections 2.1 and 2.3).
pub(crate) fn default_locations() -> Vec<Location> {
    vec![
        Location::Header {
            name: AUTHORIZATION,
            prefix: "Bearer ".to_owned(),
        },
        Location::Param("access_token".to_owned()),
    ]
}

impl Location {
    /// The token at this location, if the request carries one.
    pub(crate) fn extract(&self, headers: &HeaderMap, uri: &Uri) -> Option<String> {
        match self {
            Location::Header { name, prefix } => headers
                .get_all(name)
                .iter()
                .find_map(|value| from_header(value, prefix)),
            Location::Param(name) => query_pairs(uri.query()?)
                .find(|(key, _)| key == name)
                .map(|(_, value)| value)
                .filter(|v| !v.is_empty()),
            Location::Cookie(name) => headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(key, _)| key.trim() == name)
                .map(|(_, value)| value.trim().trim_matches('"').to_owned())
                .filter(|v| !v.is_empty()),
        }
    }

    /// The edit that removes the token from this location (`forwardOriginalToken: false`).
    pub(crate) fn removal(&self) -> super::RequestEdit {
        match self {
            Location::Header { name, .. } => super::RequestEdit::RemoveHeader(name.clone()),
            Location::Param(name) => super::RequestEdit::RemoveQueryParam(name.clone()),
            Location::Cookie(name) => super::RequestEdit::RemoveCookie(name.clone()),
        }
    }
}

/// A header value without `prefix`: the token is what follows it, up to the first space or comma (Envoy
/// reads a JWT's characters after the prefix the same way). Auth schemes are case-insensitive (RFC 7235),
/// so the prefix is compared without regard to ASCII case.
fn from_header(value: &HeaderValue, prefix: &str) -> Option<String> {
    let value = value.to_str().ok()?.trim();
    let rest = if prefix.is_empty() {
        value
    } else {
        let head = value.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(prefix) {
            return None;
        }
        value.get(prefix.len()..)?.trim_start()
    };
    let token = rest
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .next()
        .unwrap_or_default();
    (!token.is_empty()).then(|| token.to_owned())
}

/// `key=value` pairs of a query string, percent-decoded (`+` is a space, as in forms).
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key), percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `uri` without the query parameters named `name`; `None` when the URI does not change (or cannot be
/// rebuilt, which only an already-invalid URI could cause).
pub(crate) fn without_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let drop = !pair.is_empty() && percent_decode(key) == name;
            removed |= drop;
            !drop
        })
        .filter(|pair| !pair.is_empty())
        .collect();
    if !removed {
        return None;
    }
    let mut path_and_query = uri.path().to_owned();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).ok()
}

/// Removes the cookie `name` from every `Cookie` header, dropping headers left empty.
pub(crate) fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    let mut kept_values = Vec::with_capacity(values.len());
    for value in values {
        let Ok(text) = value.to_str() else {
            // Not text: we cannot have read a token from it, so it stays as it was.
            kept_values.push(value);
            continue;
        };
        let kept: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .filter(|pair| pair.split_once('=').is_none_or(|(k, _)| k.trim() != name))
            .collect();
        if !kept.is_empty()
            && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
        {
            kept_values.push(value);
        }
    }
    headers.remove(COOKIE);
    for value in kept_values {
        headers.append(COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn bearer_prefix_is_case_insensitive_and_other_schemes_hold_no_token() {
        let loc = &default_locations()[0];
        let uri: Uri = "/".parse().unwrap();
        let h = headers(&[("authorization", "bearer a.b.c")]);
        assert_eq!(loc.extract(&h, &uri).as_deref(), Some("a.b.c"));
        let h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(loc.extract(&h, &uri), None);
        let h = headers(&[("authorization", "Bearer ")]);
        assert_eq!(loc.extract(&h, &uri), None);
    }

    #[test]
    fn query_param_is_decoded_and_removed_alone() {
        let uri: Uri = "/p?a=1&access_token=x%2Ey.z&b=2".parse().unwrap();
        let loc = Location::Param("access_token".into());
        assert_eq!(loc.extract(&HeaderMap::new(), &uri).as_deref(), Some("x.y.z"));
        let stripped = without_param(&uri, "access_token").unwrap();
        assert_eq!(stripped.to_string(), "/p?a=1&b=2");
        let only: Uri = "/p?access_token=t".parse().unwrap();
        assert_eq!(without_param(&only, "access_token").unwrap().to_string(), "/p");
        assert_eq!(without_param(&only, "other"), None);
    }

    #[test]
    fn cookie_is_found_and_removed_alone() {
        let mut h = headers(&[("cookie", "a=1; session=tok.en.x; b=\"2\"")]);
        let loc = Location::Cookie("session".into());
        let uri: Uri = "/".parse().unwrap();
        assert_eq!(loc.extract(&h, &uri).as_deref(), Some("tok.en.x"));
        remove_cookie(&mut h, "session");
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=\"2\"");
        remove_cookie(&mut h, "a");
        remove_cookie(&mut h, "b");
        assert!(h.get(COOKIE).is_none());
    }
}
