//! Loads Service, EndpointSlice and (core/v1) Endpoints objects from manifest files, as `kubectl get
//! -o yaml` writes them.
//!
//! A PATH is either one file (read whatever its name) or a directory: its `*.yaml`, `*.yml` and
//! `*.json` files, sorted by name, NOT recursive (like `kubectl apply -f DIR` without `-R`). Hidden
//! files (`.x.swp`, `.#x`, a ConfigMap mount's `..data`) and backups (`x~`) are skipped, so editors'
//! temporary files never get loaded half-written. A load is all or nothing: any error (in any file)
//! rejects the whole set, so a half-parsed edit is never applied; an empty file counts as a write in
//! progress (an error), not as "no objects"; so is a set in which every object is of a kind ringlb
//! does not read (a file replaced by the wrong one would otherwise empty the table), unless a file
//! says "nothing" on purpose (only comments, or an empty list). Objects without a namespace get
//! `default`; the same kind/namespace/name defined twice is an error.

mod error;
mod parse;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::ObjectRef;

pub(crate) use error::ErrorList;
pub use error::{Location, ManifestError, ReadError};

/// The objects of one successful load, in file order then document order.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// core/v1 Endpoints, used for selector-less Services without slices (see `lb_core::build`).
    pub endpoints: Vec<Endpoints>,
}

/// The content of one manifest file, as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: PathBuf,
    pub text: String,
}

impl ManifestSet {
    /// Reads and parses every manifest file at `path` (see the module doc for which files).
    pub fn load(path: &Path) -> Result<ManifestSet, Vec<ManifestError>> {
        let files = read_manifest_files(path).map_err(|error| vec![error.into()])?;
        ManifestSet::from_files(&files)
    }

    /// Parses already-read files as one set (duplicates are detected across all of them).
    pub fn from_files(files: &[ManifestFile]) -> Result<ManifestSet, Vec<ManifestError>> {
        let mut parsed = parse::Parsed::default();
        let mut errors = Vec::new();
        // Whether some file holds objects ringlb reads, or says "nothing" on purpose.
        let mut meant_for_ringlb = false;
        for file in files {
            if file.text.trim().is_empty() {
                errors.push(ManifestError::EmptyFile { path: file.path.clone() });
                continue;
            }
            let (read, ignored) = (parsed.read(), parsed.ignored.len());
            parse::parse_file(&file.path, &file.text, &mut parsed, &mut errors);
            meant_for_ringlb |= parsed.read() > read || parsed.ignored.len() == ignored;
        }
        if !meant_for_ringlb && let Some((at, kind)) = parsed.ignored.first() {
            errors.push(ManifestError::OnlyOtherKinds { at: at.clone(), kind: kind.clone() });
        }
        let mut seen: HashMap<ObjectRef, Location> = HashMap::new();
        let all = parsed.services.iter().map(|(at, object, _)| (at, object));
        let all = all.chain(parsed.slices.iter().map(|(at, object, _)| (at, object)));
        for (at, object) in all.chain(parsed.endpoints.iter().map(|(at, object, _)| (at, object))) {
            if let Some(first) = seen.get(object) {
                errors.push(ManifestError::Duplicate {
                    object: object.clone(),
                    first: first.clone(),
                    second: at.clone(),
                });
            } else {
                seen.insert(object.clone(), at.clone());
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ManifestSet {
            services: parsed.services.into_iter().map(|(_, _, service)| service).collect(),
            slices: parsed.slices.into_iter().map(|(_, _, slice)| slice).collect(),
            endpoints: parsed.endpoints.into_iter().map(|(_, _, endpoints)| endpoints).collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && self.endpoints.is_empty()
    }
}

/// Parses manifest text that did not come from a file (e.g. one embedded in the binary); `origin`
/// names it in errors, and is read as JSON when it ends in `.json`, as YAML otherwise.
pub fn parse_manifest_str(text: &str, origin: impl AsRef<Path>) -> Result<ManifestSet, Vec<ManifestError>> {
    let file = ManifestFile { path: origin.as_ref().to_path_buf(), text: text.to_owned() };
    ManifestSet::from_files(std::slice::from_ref(&file))
}

/// Whether a file name in a manifest directory is loaded (see the module doc).
pub fn is_manifest_file_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| ["yaml", "yml", "json"].iter().any(|known| ext.eq_ignore_ascii_case(known)))
}

/// The files a load of `path` reads: `path` itself if it is a file, else its manifest files, sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let io_error = |path: &Path, reason| ReadError { path: path.to_path_buf(), reason };
    let metadata = fs::metadata(path).map_err(|reason| io_error(path, reason))?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|reason| io_error(path, reason))? {
        let entry = entry.map_err(|reason| io_error(path, reason))?;
        if !is_manifest_file_name(&entry.file_name()) {
            continue;
        }
        let file = entry.path();
        // Follows symlinks (ConfigMap mounts are symlinks); a dangling one is an error, not a skip,
        // because the user asked for that file.
        let metadata = fs::metadata(&file).map_err(|reason| io_error(&file, reason))?;
        if metadata.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the content of every file [`manifest_files`] lists.
pub fn read_manifest_files(path: &Path) -> Result<Vec<ManifestFile>, ReadError> {
    manifest_files(path)?
        .into_iter()
        .map(|path| match fs::read_to_string(&path) {
            Ok(text) => Ok(ManifestFile { path, text }),
            Err(reason) => Err(ReadError { path, reason }),
        })
        .collect()
}
