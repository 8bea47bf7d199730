//! Turns what a user typed (`./models`, `file:///srv/registry`, `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `memory://`) into an object store and a root path. Cloud stores take
//! their settings (credentials, region, endpoint) from the environment, as object_store's
//! builders read them (`AWS_*`, `GOOGLE_*`), and from explicit `key=value` options with
//! object_store's configuration keys (`aws_endpoint`, `aws_allow_http`, …), which win.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

use crate::RegistryError;

/// An opened location.
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
}

/// Opens `location`. With `create`, a missing local folder is created (a new registry);
/// otherwise it must exist (a model repository). `options` configure cloud stores.
pub fn open(
    location: &str,
    create: bool,
    options: &[(String, String)],
) -> Result<Location, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidLocation {
        location: location.to_string(),
        reason,
    };
    let Some((scheme, rest)) = location.split_once("://") else {
        return local(std::path::Path::new(location), create).map_err(invalid);
    };
    match scheme {
        "file" => local(std::path::Path::new(rest), create).map_err(invalid),
        "memory" => Ok(Location {
            store: Arc::new(object_store::memory::InMemory::new()),
            root: Path::default(),
        }),
        "s3" | "s3a" => cloud::s3(location, options).map_err(invalid),
        "gs" => cloud::gcs(location, options).map_err(invalid),
        other => Err(invalid(format!(
            "unknown scheme '{other}': use a folder, file://, s3://, gs:// or memory://"
        ))),
    }
}

fn local(dir: &std::path::Path, create: bool) -> Result<Location, String> {
    if create {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the folder: {e}"))?;
    }
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("{e} (is the path right?)"))?;
    if !dir.is_dir() {
        return Err("not a directory".into());
    }
    let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| e.to_string())?;
    Ok(Location {
        store: Arc::new(store),
        root: Path::default(),
    })
}

#[cfg(feature = "cloud")]
mod cloud {
    use std::sync::Arc;

    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    use object_store::path::Path;

    use super::Location;

    /// S3 or any S3-compatible server. The registry needs create-only puts
    /// (`If-None-Match: *`), which S3 and compatible servers support.
    pub fn s3(url: &str, options: &[(String, String)]) -> Result<Location, String> {
        let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        let mut builder = AmazonS3Builder::from_env().with_url(url);
        for (key, value) in options {
            let key: AmazonS3ConfigKey = key.parse().map_err(|e| format!("option '{key}': {e}"))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        Ok(Location {
            store: Arc::new(store),
            root: Path::from(parsed.path()),
        })
    }

    pub fn gcs(url: &str, options: &[(String, String)]) -> Result<Location, String> {
        let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url);
        for (key, value) in options {
            let key: GoogleConfigKey = key.parse().map_err(|e| format!("option '{key}': {e}"))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        Ok(Location {
            store: Arc::new(store),
            root: Path::from(parsed.path()),
        })
    }
}

#[cfg(not(feature = "cloud"))]
mod cloud {
    use super::Location;

    const NOT_BUILT: &str = "this build has no cloud storage support (build with --features cloud)";

    pub fn s3(_: &str, _: &[(String, String)]) -> Result<Location, String> {
        Err(NOT_BUILT.into())
    }

    pub fn gcs(_: &str, _: &[(String, String)]) -> Result<Location, String> {
        Err(NOT_BUILT.into())
    }
}
