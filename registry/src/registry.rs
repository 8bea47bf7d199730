//! The model registry on an object store: versioned, immutable model versions with manifests, and
//! per-model references (aliases, stages) as a revision log.
//!
//! Layout (Triton-compatible paths, so a registry is also a readable model tree):
//! `{root}/{model}/{version}/{files…}`, `{root}/{model}/{version}/manifest.json` (written last: a
//! version without one does not exist), `{root}/{model}/{version}/.claim` (reserves the number),
//! `{root}/{model}/refs/{revision}.json` (see `refs.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use std::io::{Read, Write};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    GetResultPayload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart,
};
use sha2::{Digest, Sha256};

use crate::manifest::{FileEntry, Manifest};
use crate::refs::{self, Action, Change, Refs, Stage, StageRecord};
use crate::{RegistryError, location};

/// Files larger than this are uploaded in parts.
const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Part size for multipart uploads (S3 needs at least 5 MiB per part).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts transferred at once, each way.
const PARTS_IN_FLIGHT: usize = 4;

/// Progress of a transfer, in bytes; lets the CLI draw a bar without the library knowing how.
pub trait Progress: Send + Sync {
    fn start(&self, file: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// One file to push: its path inside the version, and its bytes (shared, so a copy is cheap).
#[derive(Clone)]
pub struct PushFile {
    pub path: String,
    pub contents: Bytes,
}

/// The result of checking one file against its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub path: String,
    pub expected: String,
    /// The checksum found, or `None` when the file is missing.
    pub actual: Option<String>,
}

impl FileCheck {
    pub fn ok(&self) -> bool {
        self.actual.as_deref() == Some(self.expected.as_str())
    }
}

/// A registry opened at a location.
#[derive(Clone)]
pub struct Registry {
    pub(crate) store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn missing(manifest: &Manifest, entry: &FileEntry) -> RegistryError {
    RegistryError::Corrupt(format!(
        "{} v{}: file '{}' is missing",
        manifest.name, manifest.version, entry.path
    ))
}

fn mismatch(manifest: &Manifest, entry: &FileEntry, actual: &str) -> RegistryError {
    RegistryError::Corrupt(format!(
        "{} v{}: file '{}' has sha256 {actual}, the manifest says {}",
        manifest.name, manifest.version, entry.path, entry.sha256
    ))
}

fn io_error(path: &std::path::Path, e: std::io::Error) -> RegistryError {
    RegistryError::Io(format!("{}: {e}", path.display()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The current time as RFC 3339, for manifests and history.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{kind} '{name}' must be 1-128 characters of letters, digits, '_', '-' or '.', not starting with '.'"
        )))
    }
}

/// How many times a reference change is decided again after racing a non-overlapping one.
const CHANGE_ATTEMPTS: usize = 8;

impl Registry {
    /// Opens (and for a local folder, creates) a registry.
    pub fn open(location: &str) -> Result<Self, RegistryError> {
        Self::open_with(location, &[])
    }

    /// Opens a registry with object-store options (`aws_endpoint=…`, …) beside the environment.
    pub fn open_with(location: &str, options: &[(String, String)]) -> Result<Self, RegistryError> {
        let opened = location::open(location, true, options)?;
        Ok(Self {
            store: opened.store,
            root: opened.root,
            location: location.to_string(),
        })
    }

    /// A registry on a store the caller built (tests, embedding).
    pub fn with_store(store: Arc<dyn ObjectStore>, root: Path, location: &str) -> Self {
        Self {
            store,
            root,
            location: location.to_string(),
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn model_dir(&self, model: &str) -> Path {
        self.root.clone().join(model)
    }

    fn version_path(&self, model: &str, version: u64, file: &str) -> Path {
        let mut path = self.model_dir(model).join(version.to_string());
        for part in file.split('/') {
            path = path.join(part);
        }
        path
    }

    fn refs_dir(&self, model: &str) -> Path {
        self.model_dir(model).join("refs")
    }

    /// Models that have at least one version, sorted.
    pub async fn models(&self) -> Result<Vec<String>, RegistryError> {
        let listing = self.store.list_with_delimiter(Some(&self.root)).await?;
        let mut models = Vec::new();
        for prefix in listing.common_prefixes {
            let Some(name) = prefix.filename().map(str::to_string) else {
                continue;
            };
            if check_name("model", &name).is_ok() && !self.versions(&name).await?.is_empty() {
                models.push(name);
            }
        }
        models.sort();
        Ok(models)
    }

    /// Version numbers folders exist for (pushed, or being pushed).
    async fn numbers(&self, model: &str) -> Result<BTreeSet<u64>, RegistryError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.model_dir(model)))
            .await?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect())
    }

    /// Versions that exist (their manifest is written), ascending.
    pub async fn versions(&self, model: &str) -> Result<Vec<u64>, RegistryError> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.model_dir(model)))
            .try_collect()
            .await?;
        let mut versions: Vec<u64> = objects
            .iter()
            .filter_map(|o| {
                let parts: Vec<_> = o.location.parts().collect();
                let n = parts.len();
                (n >= 2 && parts[n - 1].as_ref() == "manifest.json")
                    .then(|| parts[n - 2].as_ref().parse().ok())
                    .flatten()
            })
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    pub async fn manifest(&self, model: &str, version: u64) -> Result<Manifest, RegistryError> {
        let path = self.version_path(model, version, "manifest.json");
        let bytes = match self.store.get(&path).await {
            Ok(result) => result.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.missing_version(model, version).await);
            }
            Err(e) => return Err(e.into()),
        };
        Manifest::from_json(&bytes)
            .map_err(|reason| RegistryError::Corrupt(format!("{model} v{version}: {reason}")))
    }

    async fn missing_version(&self, model: &str, version: u64) -> RegistryError {
        match self.versions(model).await {
            Ok(versions) if versions.is_empty() => RegistryError::ModelNotFound(model.to_string()),
            Ok(versions) => RegistryError::VersionNotFound {
                model: model.to_string(),
                version: version.to_string(),
                available: versions,
            },
            Err(e) => e,
        }
    }

    /// A version number, or an alias, to the version it names.
    pub async fn resolve(&self, model: &str, reference: &str) -> Result<u64, RegistryError> {
        if let Ok(version) = reference.parse::<u64>() {
            self.manifest(model, version).await?;
            return Ok(version);
        }
        let refs = self.refs(model).await?;
        match refs.aliases.get(reference) {
            Some(&version) => Ok(version),
            None => {
                let versions = self.versions(model).await?;
                if versions.is_empty() {
                    return Err(RegistryError::ModelNotFound(model.to_string()));
                }
                Err(RegistryError::VersionNotFound {
                    model: model.to_string(),
                    version: reference.to_string(),
                    available: versions,
                })
            }
        }
    }

    /// Pushes a new version: claims the next number (create-only, so two pushes never get the
    /// same one), uploads the files, then writes the manifest (create-only, last). `manifest`
    /// is completed with the name, version, files and their checksums.
    pub async fn push(
        &self,
        model: &str,
        files: Vec<PushFile>,
        mut manifest: Manifest,
        progress: &dyn Progress,
    ) -> Result<Manifest, RegistryError> {
        check_name("model", model)?;
        if files.is_empty() {
            return Err(RegistryError::Invalid(
                "a version needs at least one file".into(),
            ));
        }
        for file in &files {
            if file
                .path
                .split('/')
                .any(|p| p.is_empty() || p == ".." || p.starts_with('.'))
                || file.path == "manifest.json"
            {
                return Err(RegistryError::Invalid(format!(
                    "file name '{}' is not allowed in a version",
                    file.path
                )));
            }
        }
        let version = self.claim(model).await?;
        let mut entries = Vec::with_capacity(files.len());
        for file in files {
            let sha256 = sha256_hex(&file.contents);
            let size = file.contents.len() as u64;
            self.upload(
                &self.version_path(model, version, &file.path),
                &file.path,
                file.contents,
                progress,
            )
            .await?;
            entries.push(FileEntry {
                path: file.path,
                sha256,
                size,
            });
        }
        manifest.name = model.to_string();
        manifest.version = version;
        manifest.files = entries;
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        self.store
            .put_opts(
                &self.version_path(model, version, "manifest.json"),
                PutPayload::from(json),
                PutOptions::from(PutMode::Create),
            )
            .await?;
        Ok(manifest)
    }

    /// Reserves the next version number with a create-only marker; a number someone else took
    /// first is skipped.
    async fn claim(&self, model: &str) -> Result<u64, RegistryError> {
        let mut version = self.numbers(model).await?.last().map_or(1, |n| n + 1);
        for _ in 0..64 {
            let marker = self.version_path(model, version, ".claim");
            let body = serde_json::json!({ "claimed_at": now() }).to_string();
            match self
                .store
                .put_opts(
                    &marker,
                    PutPayload::from(body),
                    PutOptions::from(PutMode::Create),
                )
                .await
            {
                Ok(_) => return Ok(version),
                Err(object_store::Error::AlreadyExists { .. }) => version += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Conflict(format!(
            "could not claim a version number for '{model}' after 64 tries; too many concurrent pushes"
        )))
    }

    async fn upload(
        &self,
        path: &Path,
        name: &str,
        contents: Bytes,
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        progress.start(name, contents.len() as u64);
        if contents.len() <= MULTIPART_THRESHOLD {
            let size = contents.len() as u64;
            self.store.put(path, PutPayload::from(contents)).await?;
            progress.advance(size);
        } else {
            let upload = self.store.put_multipart(path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for chunk in contents.chunks(PART_SIZE) {
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(chunk);
                progress.advance(chunk.len() as u64);
            }
            writer.finish().await?;
        }
        progress.finish();
        Ok(())
    }

    /// One file of a version, checked against the manifest's checksum.
    pub async fn file(
        &self,
        manifest: &Manifest,
        entry: &FileEntry,
    ) -> Result<Bytes, RegistryError> {
        let path = self.version_path(&manifest.name, manifest.version, &entry.path);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Err(missing(manifest, entry)),
            Err(e) => return Err(e.into()),
        };
        // Hashing a large artifact takes a while: off the async runtime, which serves meanwhile.
        let hashed = bytes.clone();
        let actual = tokio::task::spawn_blocking(move || sha256_hex(&hashed))
            .await
            .unwrap_or_else(|_| "unknown (the hashing task failed)".to_string());
        if actual != entry.sha256 {
            return Err(mismatch(manifest, entry, &actual));
        }
        Ok(bytes)
    }

    /// Reads an object piece by piece into `sink`, so memory stays bounded for any file size:
    /// one streamed GET from a remote store, large direct reads from a local file (object_store's
    /// own local stream reads 8 KiB at a time). Returns the sha256 of what was read, or `None`
    /// when the object does not exist. For the CLI's transfers: local reads block the thread.
    async fn read_parts(
        &self,
        path: &Path,
        mut sink: impl FnMut(&[u8]) -> Result<(), RegistryError>,
    ) -> Result<Option<String>, RegistryError> {
        let result = match self.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut hasher = Sha256::new();
        match result.payload {
            GetResultPayload::File(mut file, local) => {
                let mut buffer = vec![0; PART_SIZE];
                loop {
                    let read = file.read(&mut buffer).map_err(|e| io_error(&local, e))?;
                    if read == 0 {
                        break;
                    }
                    hasher.update(&buffer[..read]);
                    sink(&buffer[..read])?;
                }
            }
            GetResultPayload::Stream(mut stream) => {
                while let Some(chunk) = stream.try_next().await? {
                    hasher.update(&chunk);
                    sink(&chunk)?;
                }
            }
        }
        Ok(Some(hex(&hasher.finalize())))
    }

    /// Downloads every file of a version into `dir` (and the manifest), verifying each.
    pub async fn pull(
        &self,
        model: &str,
        version: u64,
        dir: &std::path::Path,
        progress: &dyn Progress,
    ) -> Result<Manifest, RegistryError> {
        let manifest = self.manifest(model, version).await?;
        for entry in &manifest.files {
            progress.start(&entry.path, entry.size);
            let target = dir.join(&entry.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
            }
            // Written beside the target and renamed once the checksum matches, so a failed pull
            // never leaves a file that looks complete.
            let partial = dir.join(format!("{}.partial", entry.path));
            let mut file = std::fs::File::create(&partial).map_err(|e| io_error(&partial, e))?;
            let path = self.version_path(model, version, &entry.path);
            let actual = self
                .read_parts(&path, |part| {
                    progress.advance(part.len() as u64);
                    file.write_all(part).map_err(|e| io_error(&partial, e))
                })
                .await;
            drop(file);
            let checked = match actual {
                Ok(Some(actual)) if actual == entry.sha256 => Ok(()),
                Ok(Some(actual)) => Err(mismatch(&manifest, entry, &actual)),
                Ok(None) => Err(missing(&manifest, entry)),
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
            std::fs::rename(&partial, &target).map_err(|e| io_error(&target, e))?;
            progress.finish();
        }
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        std::fs::write(dir.join("manifest.json"), json).map_err(|e| io_error(dir, e))?;
        Ok(manifest)
    }

    /// Recomputes the checksum of every file of a version.
    pub async fn verify(&self, model: &str, version: u64) -> Result<Vec<FileCheck>, RegistryError> {
        let manifest = self.manifest(model, version).await?;
        let mut checks = Vec::with_capacity(manifest.files.len());
        for entry in &manifest.files {
            let path = self.version_path(model, version, &entry.path);
            let actual = self.read_parts(&path, |_| Ok(())).await?;
            checks.push(FileCheck {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(checks)
    }

    // ---- references ---------------------------------------------------------------------------

    /// The model's current references (revision 0 when nothing was ever set).
    pub async fn refs(&self, model: &str) -> Result<Refs, RegistryError> {
        Ok(self.refs_after(model, 0).await?.unwrap_or_default())
    }

    /// The latest references if they changed after `revision`; lists only newer revisions.
    pub async fn refs_after(
        &self,
        model: &str,
        revision: u64,
    ) -> Result<Option<Refs>, RegistryError> {
        let dir = self.refs_dir(model);
        let offset = dir.clone().join(refs::revision_file(revision));
        let newer: Vec<_> = self
            .store
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await?;
        let latest = newer
            .iter()
            .filter_map(|o| {
                Some((
                    refs::parse_revision_file(o.location.filename()?)?,
                    &o.location,
                ))
            })
            .filter(|(r, _)| *r > revision)
            .max_by_key(|(r, _)| *r);
        match latest {
            None => Ok(None),
            Some((_, path)) => {
                let bytes = self.store.get(path).await?.bytes().await?;
                Refs::from_json(&bytes)
                    .map(Some)
                    .map_err(|reason| RegistryError::Corrupt(format!("{model} refs: {reason}")))
            }
        }
    }

    /// Every revision of the model's references, oldest first.
    pub async fn history(&self, model: &str) -> Result<Vec<Refs>, RegistryError> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.refs_dir(model)))
            .try_collect()
            .await?;
        let mut revisions: Vec<(u64, Path)> = objects
            .into_iter()
            .filter_map(|o| {
                Some((
                    refs::parse_revision_file(o.location.filename()?)?,
                    o.location,
                ))
            })
            .collect();
        revisions.sort_by_key(|(r, _)| *r);
        let mut history = Vec::with_capacity(revisions.len());
        for (_, path) in revisions {
            let bytes = self.store.get(&path).await?.bytes().await?;
            history.push(
                Refs::from_json(&bytes)
                    .map_err(|reason| RegistryError::Corrupt(format!("{model} refs: {reason}")))?,
            );
        }
        Ok(history)
    }

    /// Applies one change on top of the latest revision and records it as the next one. If
    /// another writer recorded that revision first, nothing is written; when the revisions it
    /// missed touched other aliases and versions, the change is decided again on the new
    /// references (up to `CHANGE_ATTEMPTS` times), and only a change that overlaps one it did not
    /// see (the same alias, an archived version) is a conflict. Nothing is ever lost.
    async fn change(
        &self,
        model: &str,
        change: impl Fn(&mut Refs) -> Result<Change, RegistryError>,
    ) -> Result<Refs, RegistryError> {
        if self.versions(model).await?.is_empty() {
            return Err(RegistryError::ModelNotFound(model.to_string()));
        }
        let mut refs = self.refs(model).await?;
        for _ in 0..CHANGE_ATTEMPTS {
            let seen = refs.revision;
            let mut next = refs.clone();
            let what = change(&mut next)?;
            next.revision = seen + 1;
            next.change = Some(what.clone());
            let path = self
                .refs_dir(model)
                .join(refs::revision_file(next.revision));
            let json = serde_json::to_vec_pretty(&next).expect("refs serialize");
            match self
                .store
                .put_opts(
                    &path,
                    PutPayload::from(json),
                    PutOptions::from(PutMode::Create),
                )
                .await
            {
                Ok(_) => return Ok(next),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let missed: Vec<Refs> = self
                        .history(model)
                        .await?
                        .into_iter()
                        .filter(|r| r.revision > seen)
                        .collect();
                    if let Some(clash) = missed
                        .iter()
                        .filter_map(|r| r.change.as_ref().map(|c| (r.revision, c)))
                        .find(|(_, c)| c.overlaps(&what))
                    {
                        return Err(RegistryError::Conflict(format!(
                            "revision {} of '{model}' ({} by {}) changed the same thing at the same time; nothing was changed, look again (marquee registry show {model}) and retry",
                            clash.0,
                            clash.1.action.name(),
                            clash.1.by
                        )));
                    }
                    refs = missed.into_iter().last().unwrap_or(refs);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Conflict(format!(
            "the references of '{model}' kept changing ({CHANGE_ATTEMPTS} attempts); nothing was changed, retry"
        )))
    }

    /// Moves production back to the version that held it before the current one, or to `to`
    /// (any earlier production version), in one step: the version was approved for production
    /// once, so no new approval is asked, and the change is recorded with who and why. The
    /// version leaving production goes back to staging if the staging alias points at it, else
    /// to dev.
    pub async fn rollback(
        &self,
        model: &str,
        to: Option<u64>,
        by: &str,
        reason: &str,
    ) -> Result<Refs, RegistryError> {
        let history = self.history(model).await?;
        // Every version that held production, most recent first, with the approval it had.
        let mut held: Vec<(u64, Option<String>)> = Vec::new();
        for refs in history.iter().rev() {
            if let Some(&version) = refs.aliases.get(Stage::Production.name())
                && !held.iter().any(|(v, _)| *v == version)
            {
                let approval = refs
                    .stages
                    .get(&version)
                    .and_then(|r| r.approved_by.clone());
                held.push((version, approval));
            }
        }
        self.change(model, |refs| {
            let current = refs.aliases.get(Stage::Production.name()).copied();
            let candidates: Vec<&(u64, Option<String>)> = held
                .iter()
                .filter(|(v, _)| Some(*v) != current && !refs.archived.contains(v))
                .collect();
            let (target, approval) = match to {
                Some(version) => candidates
                    .iter()
                    .find(|(v, _)| *v == version)
                    .map(|(v, a)| (*v, a.clone()))
                    .ok_or_else(|| {
                        let earlier: Vec<String> =
                            candidates.iter().map(|(v, _)| format!("v{v}")).collect();
                        RegistryError::Refused(format!(
                            "{model} v{version} was never in production before (or is archived or current); earlier production versions: {}",
                            if earlier.is_empty() { "none".to_string() } else { earlier.join(", ") }
                        ))
                    })?,
                None => candidates
                    .first()
                    .map(|(v, a)| (*v, a.clone()))
                    .ok_or_else(|| {
                        RegistryError::Refused(format!(
                            "{model} has no earlier production version to roll back to"
                        ))
                    })?,
            };
            refs.aliases.insert(Stage::Production.name().to_string(), target);
            // The version leaving production keeps a stage only where an alias says so, as after
            // a promotion: staging when the staging alias still points at it, else dev.
            if let Some(current) = current {
                if refs.aliases.get(Stage::Staging.name()) == Some(&current) {
                    refs.stages.insert(
                        current,
                        StageRecord {
                            stage: Stage::Staging,
                            approved_by: None,
                            at: now(),
                        },
                    );
                } else {
                    refs.stages.remove(&current);
                }
            }
            refs.stages.insert(
                target,
                StageRecord {
                    stage: Stage::Production,
                    approved_by: approval.clone(),
                    at: now(),
                },
            );
            Ok(Change {
                at: now(),
                by: by.to_string(),
                action: Action::Rollback,
                alias: Some(Stage::Production.name().to_string()),
                version: Some(target),
                previous: current,
                reason: reason.to_string(),
            })
        })
        .await
    }

    async fn existing(&self, model: &str, version: u64) -> Result<(), RegistryError> {
        self.manifest(model, version).await.map(|_| ())
    }

    /// Points `alias` at `version`. The stage aliases are set by `promote`, which checks gates.
    pub async fn set_alias(
        &self,
        model: &str,
        alias: &str,
        version: u64,
        by: &str,
        reason: &str,
    ) -> Result<Refs, RegistryError> {
        check_name("alias", alias)?;
        if alias.parse::<u64>().is_ok() {
            return Err(RegistryError::Invalid(format!(
                "alias '{alias}' would read as a version number"
            )));
        }
        if Stage::parse(alias).is_ok() {
            return Err(RegistryError::Refused(format!(
                "'{alias}' is a stage: use `marquee registry promote {model} {version} --to {alias}`"
            )));
        }
        self.existing(model, version).await?;
        self.change(model, |refs| {
            if refs.archived.contains(&version) {
                return Err(RegistryError::Refused(format!(
                    "{model} v{version} is archived; an alias cannot point at it"
                )));
            }
            let previous = refs.aliases.insert(alias.to_string(), version);
            Ok(Change {
                at: now(),
                by: by.to_string(),
                action: Action::AliasSet,
                alias: Some(alias.to_string()),
                version: Some(version),
                previous,
                reason: reason.to_string(),
            })
        })
        .await
    }

    pub async fn remove_alias(
        &self,
        model: &str,
        alias: &str,
        by: &str,
        reason: &str,
    ) -> Result<Refs, RegistryError> {
        self.change(model, |refs| {
            let previous = refs.aliases.remove(alias).ok_or_else(|| {
                RegistryError::Invalid(format!("model '{model}' has no alias '{alias}'"))
            })?;
            if let Ok(stage) = Stage::parse(alias) {
                // The version leaves the stage it was serving from.
                if refs.stage(previous) == stage {
                    refs.stages.remove(&previous);
                }
            }
            Ok(Change {
                at: now(),
                by: by.to_string(),
                action: Action::AliasRemove,
                alias: Some(alias.to_string()),
                version: None,
                previous: Some(previous),
                reason: reason.to_string(),
            })
        })
        .await
    }

    /// Moves a version to a stage: dev -> staging -> production. Production needs an approver and
    /// every metric gate of the version passing. The stage's alias then points at the version.
    pub async fn promote(
        &self,
        model: &str,
        version: u64,
        stage: Stage,
        approved_by: Option<&str>,
        by: &str,
        reason: &str,
    ) -> Result<Refs, RegistryError> {
        let manifest = self.manifest(model, version).await?;
        if stage == Stage::Production {
            if approved_by.is_none_or(str::is_empty) {
                return Err(RegistryError::Refused(format!(
                    "promoting {model} v{version} to production needs --approved-by NAME"
                )));
            }
            let failures = manifest.gate_failures();
            if !failures.is_empty() {
                return Err(RegistryError::Refused(format!(
                    "{model} v{version} cannot go to production: {}",
                    failures.join("; ")
                )));
            }
        }
        self.change(model, |refs| {
            if refs.archived.contains(&version) {
                return Err(RegistryError::Refused(format!("{model} v{version} is archived")));
            }
            let current = refs.stage(version);
            let allowed = match stage {
                Stage::Dev => false,
                Stage::Staging => current == Stage::Dev,
                Stage::Production => current == Stage::Staging,
            };
            if !allowed {
                return Err(RegistryError::Refused(format!(
                    "{model} v{version} is in {}; versions move dev -> staging -> production, one step at a time",
                    current.name()
                )));
            }
            let previous = refs.aliases.insert(stage.name().to_string(), version);
            if let Some(previous) = previous.filter(|p| *p != version)
                && refs.stage(previous) == stage
            {
                refs.stages.remove(&previous);
            }
            refs.stages.insert(
                version,
                StageRecord {
                    stage,
                    approved_by: approved_by.map(str::to_string),
                    at: now(),
                },
            );
            Ok(Change {
                at: now(),
                by: by.to_string(),
                action: Action::Promote,
                alias: Some(stage.name().to_string()),
                version: Some(version),
                previous,
                reason: reason.to_string(),
            })
        })
        .await
    }

    /// Marks a version archived: hidden from serving. Refused while an alias points at it.
    pub async fn archive(
        &self,
        model: &str,
        version: u64,
        by: &str,
        reason: &str,
    ) -> Result<Refs, RegistryError> {
        self.existing(model, version).await?;
        self.change(model, |refs| {
            let aliases = refs.aliases_of(version);
            if !aliases.is_empty() {
                return Err(RegistryError::Refused(format!(
                    "{model} v{version} is still pointed at by {}; move or remove those aliases first",
                    aliases.join(", ")
                )));
            }
            if !refs.archived.insert(version) {
                return Err(RegistryError::Invalid(format!("{model} v{version} is already archived")));
            }
            refs.stages.remove(&version);
            Ok(Change {
                at: now(),
                by: by.to_string(),
                action: Action::Archive,
                alias: None,
                version: Some(version),
                previous: None,
                reason: reason.to_string(),
            })
        })
        .await
    }
}
