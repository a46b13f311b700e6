//! Request edits after authentication: `forwardOriginalToken`, `outputPayloadToHeader`,
//! `outputClaimToHeaders`.

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde_json::Value;

use super::extract::{remove_cookie, without_param};

/// One change to the request sent upstream, produced by
/// [`JwtAuthenticator::request_edits`](super::JwtAuthenticator::request_edits) and applied with
/// [`apply_edits`]. Kept as data so a proxy can log or test them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestEdit {
    /// Remove every value of a header.
    RemoveHeader(HeaderName),
    /// Set a header, replacing any value the client sent.
    SetHeader(HeaderName, HeaderValue),
    /// Remove a query parameter (every occurrence) from the URI.
    RemoveQueryParam(String),
    /// Remove a cookie from the `Cookie` header(s).
    RemoveCookie(String),
}

/// Applies `edits` in order to a request's headers and URI.
pub fn apply_edits(headers: &mut HeaderMap, uri: &mut Uri, edits: &[RequestEdit]) {
    for edit in edits {
        match edit {
            RequestEdit::RemoveHeader(name) => {
                headers.remove(name);
            }
            RequestEdit::SetHeader(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            RequestEdit::RemoveQueryParam(name) => {
                if let Some(stripped) = without_param(uri, name) {
                    *uri = stripped;
                }
            }
            RequestEdit::RemoveCookie(name) => remove_cookie(headers, name),
        }
    }
}

/// A claim by name: the top-level claim if one has exactly this name (claims such as
/// `example.com/groups` contain dots), else the nested claim the dotted path leads to.
pub fn claim<'c>(claims: &'c Value, name: &str) -> Option<&'c Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    name.split('.').try_fold(claims, |value, key| value.get(key))
}

/// A claim as a header value, as Envoy's `claim_to_headers` writes it: strings as they are, numbers and
/// booleans printed, arrays of those joined with `,`. Objects, nulls and values that are not valid in a
/// header give no header.
pub(crate) fn claim_header_value(value: &Value) -> Option<HeaderValue> {
    fn scalar(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let text = match value {
        Value::Array(items) => {
            let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
            parts?.join(",")
        }
        other => scalar(other)?,
    };
    HeaderValue::from_str(&text).ok()
}
