//! Reading configuration text (bounded), splitting it into YAML documents, and sorting each document into
//! the ztunnel format or a Kubernetes object, with errors that carry the file, line and column.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeSeed;
use serde_yaml::Value;

use super::{Origin, SourceLocation, kube, ztunnel};
use crate::XdsError;

/// The largest configuration file (or inline configuration) the loader reads: 16 MiB.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The most a directory's configuration files may hold together: 64 MiB.
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;

/// One file's (or the inline configuration's) text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Source {
    /// How errors name it.
    pub(crate) name: Arc<str>,
    /// Its content.
    pub(crate) text: String,
}

/// Every document read so far, sorted by format.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    pub(crate) ztunnel: Vec<(Origin, ztunnel::Document)>,
    pub(crate) kube: kube::Objects,
}

pub(crate) fn check_size(name: &str, size: u64, limit: u64) -> Result<(), XdsError> {
    if size > limit {
        return Err(XdsError::LocalTooLarge {
            path: name.to_owned(),
            size,
            limit,
        });
    }
    Ok(())
}

fn io_error(path: &Path, source: std::io::Error) -> XdsError {
    XdsError::LocalIo {
        path: path.display().to_string(),
        source: Arc::new(source),
    }
}

/// Reads a file, or a directory's `*.yaml` and `*.yml` files (sorted by name, not recursive, hidden files
/// skipped), within the size limits.
pub(crate) fn read_path(path: &Path) -> Result<Vec<Source>, XdsError> {
    let metadata = fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !metadata.is_dir() {
        return Ok(vec![read_file(path)?]);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| io_error(path, e))? {
        let entry = entry.map_err(|e| io_error(path, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let yaml = name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml"));
        if name.starts_with('.') || !yaml {
            continue;
        }
        // Follows symlinks, as Kubernetes ConfigMap volumes are made of them.
        let file = entry.path();
        match fs::metadata(&file) {
            Ok(meta) if meta.is_file() => files.push(file),
            Ok(_) => {}
            // Removed between listing and reading: a concurrent edit, which the next poll sees whole.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&file, e)),
        }
    }
    files.sort();
    let mut total: u64 = 0;
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let source = read_file(&file)?;
        total = total.saturating_add(source.text.len() as u64);
        check_size(&path.display().to_string(), total, MAX_TOTAL_BYTES)?;
        sources.push(source);
    }
    Ok(sources)
}

fn read_file(path: &Path) -> Result<Source, XdsError> {
    let name = path.display().to_string();
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so that a file that grows after a size check is still caught.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    check_size(&name, bytes.len() as u64, MAX_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|e| XdsError::LocalConfig {
        location: SourceLocation {
            file: name.as_str().into(),
            line: line_of(e.as_bytes(), e.utf8_error().valid_up_to()),
            column: 1,
        },
        field: String::new(),
        reason: "the file is not UTF-8".to_owned(),
    })?;
    Ok(Source {
        name: name.into(),
        text,
    })
}

fn line_of(bytes: &[u8], offset: usize) -> usize {
    bytes.iter().take(offset).filter(|&&b| b == b'\n').count() + 1
}

/// What to do with one document, decided from its untyped form.
enum Plan {
    /// Empty (`---` with nothing after it).
    Skip,
    /// Istio ztunnel's static configuration.
    Ztunnel,
    /// Kubernetes objects: one, or a `List`'s items.
    Kube(kube::Plan),
}

/// Parses every document of `source` into `inventory`.
///
/// Two passes over the text: the first reads each document untyped to learn its format (and kind), the
/// second deserializes it typed, straight from the text, so that an error carries the value's own line
/// and column (a typed pass over the untyped value would only know the field path).
pub(crate) fn parse_into(source: &Source, inventory: &mut Inventory) -> Result<(), XdsError> {
    let starts = document_starts(&source.text);
    let mut plans = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&source.text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| yaml_error(&source.name, "", &e, 1))?;
        let location = document_location(source, &starts, index);
        plans.push((plan(&value, &location)?, location));
    }
    for ((plan, location), document) in plans
        .into_iter()
        .zip(serde_yaml::Deserializer::from_str(&source.text))
    {
        let origin = Origin {
            location,
            path: String::new(),
        };
        match plan {
            Plan::Skip => {}
            Plan::Ztunnel => {
                let parsed = typed(document, &origin, std::marker::PhantomData)?;
                inventory.ztunnel.push((origin, parsed));
            }
            Plan::Kube(plan) => {
                let objects = typed(document, &origin, kube::DocumentSeed(&plan))?;
                inventory.kube.extend(&origin, objects);
            }
        }
    }
    Ok(())
}

fn plan(value: &Value, location: &SourceLocation) -> Result<Plan, XdsError> {
    let at = |reason: &str| XdsError::LocalConfig {
        location: location.clone(),
        field: String::new(),
        reason: reason.to_owned(),
    };
    let mapping = match value {
        Value::Null => return Ok(Plan::Skip),
        Value::Mapping(mapping) => mapping,
        _ => return Err(at("a document must be a mapping")),
    };
    if mapping.contains_key("kind") {
        return kube::plan(value, location).map(Plan::Kube);
    }
    if ["workloads", "services", "policies"]
        .iter()
        .any(|key| mapping.contains_key(*key))
    {
        return Ok(Plan::Ztunnel);
    }
    Err(at(
        "neither a Kubernetes object (no `kind`) nor Istio ztunnel configuration (no `workloads`, \
         `services` or `policies`)",
    ))
}

/// Deserializes one document with `seed`, turning an error into one that names the field path and the
/// value's line and column.
fn typed<'de, S: DeserializeSeed<'de>>(
    document: serde_yaml::Deserializer<'de>,
    origin: &Origin,
    seed: S,
) -> Result<S::Value, XdsError> {
    let mut track = serde_path_to_error::Track::new();
    let result = seed.deserialize(serde_path_to_error::Deserializer::new(document, &mut track));
    result.map_err(|e| {
        let path = track.path().to_string();
        let path = if path == "." { String::new() } else { path };
        yaml_error(&origin.location.file, &path, &e, origin.location.line)
    })
}

/// A serde_yaml error as a [`XdsError::LocalConfig`], with the parser's position (else column 1 of
/// `fallback_line`) and without the position and path serde_yaml writes into its own message (they are
/// in the location and `field`).
pub(crate) fn yaml_error(
    file: &Arc<str>,
    field: &str,
    error: &serde_yaml::Error,
    fallback_line: usize,
) -> XdsError {
    let (line, column) = error
        .location()
        .map_or((fallback_line, 1), |l| (l.line(), l.column()));
    let mut reason = error.to_string();
    let suffix = format!(" at line {line} column {column}");
    if let Some(stripped) = reason.strip_suffix(&suffix) {
        reason = stripped.to_owned();
    }
    // serde_yaml writes its own path first (the enclosing value's, e.g. `services[0].vips` for an error
    // at `services[0].vips[0]`): drop it when the field names the same place or a place inside it.
    if let Some((path, rest)) = reason.split_once(": ")
        && !path.is_empty()
        && field.starts_with(path)
    {
        reason = rest.to_owned();
    }
    XdsError::LocalConfig {
        location: SourceLocation {
            file: file.clone(),
            line,
            column,
        },
        field: field.to_owned(),
        reason: super::bounded(&reason),
    }
}

/// The location of document `index`: its first line with content.
fn document_location(source: &Source, starts: &[usize], index: usize) -> SourceLocation {
    SourceLocation {
        file: source.name.clone(),
        line: starts.get(index).copied().unwrap_or(1),
        column: 1,
    }
}

/// The line (from 1) where each YAML document of `text` starts, as libyaml counts documents: a `---`
/// marker starts one; content before the first marker, or after a `...` end marker, forms one. The line
/// is the first one with content (or the marker, for an empty document).
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    // (line of the marker if the document has one, line of its first content)
    let mut current: (Option<usize>, Option<usize>) = (None, None);
    let mut close = |current: &mut (Option<usize>, Option<usize>)| {
        if let Some(line) = current.1.or(current.0) {
            starts.push(line);
        }
        *current = (None, None);
    };
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if is_marker(line, "---") {
            close(&mut current);
            current.0 = Some(number);
            // `--- {a: 1}`: content on the marker's own line.
            if !line[3..].trim().is_empty() && !line[3..].trim_start().starts_with('#') {
                current.1 = Some(number);
            }
        } else if is_marker(line, "...") {
            close(&mut current);
        } else if current.1.is_none() {
            let trimmed = line.trim();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && !line.starts_with('%') {
                current.1 = Some(number);
            }
        }
    }
    close(&mut current);
    starts
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}
