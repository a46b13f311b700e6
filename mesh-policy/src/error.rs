//! The one error type of `mesh-policy`.

/// Errors from reading and compiling Istio security resources. Each names the document or the resource and
/// the field, so an operator can find the line to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A YAML document does not parse (or is not a mapping).
    #[error("YAML document {document}: {reason}")]
    Yaml {
        /// 0-based index of the document in the stream.
        document: usize,
        /// The parser's message, with the line when it has one.
        reason: String,
    },
    /// A resource of a kind this crate reads has an apiVersion it does not.
    #[error(
        "{kind} {resource}: unsupported apiVersion {api_version:?} (want security.istio.io/v1 or v1beta1)"
    )]
    ApiVersion {
        /// The resource kind.
        kind: String,
        /// `namespace/name`.
        resource: String,
        /// What the document said.
        api_version: String,
    },
    /// A field holds a value Istio would reject.
    #[error("{kind} {resource}: {field}: {reason}")]
    Invalid {
        /// The resource kind.
        kind: &'static str,
        /// `namespace/name`.
        resource: String,
        /// The field path, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}
