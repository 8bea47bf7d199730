//! A Triton model repository read through `object_store`: one folder per model, an optional
//! `config.pbtxt`, and one numbered folder per version holding the artifact.

use std::sync::Arc;

use bytes::Bytes;
use marquee_proto::ModelConfig;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::RegistryError;

/// A model as the repository describes it, before anything is loaded.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub name: String,
    /// The parsed `config.pbtxt`, if the model has one.
    pub config: Option<ModelConfig>,
    /// Version folders present, ascending.
    pub versions: Vec<u64>,
    /// `pipeline.json` beside `config.pbtxt`, if present: the model's `/v1/predict` pipeline
    /// (Marquee's addition to the layout; Triton ignores the file).
    pub pipeline: Option<serde_json::Value>,
}

/// A Triton-layout model repository on any object store.
#[derive(Debug, Clone)]
pub struct ModelRepository {
    store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
}

impl ModelRepository {
    /// Opens a repository from a local path or a URL (`file://`, `s3://`, `gs://`).
    pub fn open(location: &str) -> Result<Self, RegistryError> {
        Self::open_with(location, &[])
    }

    /// Opens a repository with object-store options beside the environment.
    pub fn open_with(location: &str, options: &[(String, String)]) -> Result<Self, RegistryError> {
        let opened = crate::location::open(location, false, options)?;
        Ok(Self {
            store: opened.store,
            root: opened.root,
            location: location.to_string(),
        })
    }

    /// Where the repository is, as the user gave it.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Names of the model folders, sorted; hidden folders are skipped.
    pub async fn model_names(&self) -> Result<Vec<String>, RegistryError> {
        let listing = self.store.list_with_delimiter(Some(&self.root)).await?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Reads a model's configuration and the versions present.
    pub async fn model(&self, name: &str) -> Result<ModelSource, RegistryError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(RegistryError::ModelNotFound(name.to_string()));
        }
        let dir = self.root.clone().join(name);
        let listing = self.store.list_with_delimiter(Some(&dir)).await?;
        let has_file = |file: &str| {
            listing
                .objects
                .iter()
                .any(|o| o.location.filename() == Some(file))
        };
        let has_config = has_file("config.pbtxt");
        if listing.common_prefixes.is_empty() && !has_config {
            return Err(RegistryError::ModelNotFound(name.to_string()));
        }
        // Triton's rule: version folders are positive integers not starting with 0; others are ignored.
        let mut versions: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter(|f| !f.starts_with('0'))
            .filter_map(|f| f.parse().ok())
            .collect();
        versions.sort_unstable();
        let read = async |file: &str| -> Result<Option<bytes::Bytes>, RegistryError> {
            if !has_file(file) {
                return Ok(None);
            }
            let path = dir.clone().join(file);
            Ok(Some(self.store.get(&path).await?.bytes().await?))
        };
        let invalid = |reason: String| RegistryError::InvalidConfig {
            model: name.to_string(),
            reason,
        };
        let config = match read("config.pbtxt").await? {
            Some(bytes) => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| invalid("config.pbtxt is not UTF-8 text".into()))?;
                Some(
                    marquee_proto::parse_config_text(text)
                        .map_err(|e| invalid(format!("config.pbtxt: {e}")))?,
                )
            }
            None => None,
        };
        let pipeline = read("pipeline.json")
            .await?
            .map(|bytes| serde_json::from_slice(&bytes))
            .transpose()
            .map_err(|e| invalid(format!("pipeline.json: {e}")))?;
        Ok(ModelSource {
            name: name.to_string(),
            config,
            versions,
            pipeline,
        })
    }

    /// The bytes of one file of a model version.
    pub async fn artifact(
        &self,
        name: &str,
        version: u64,
        file: &str,
    ) -> Result<Bytes, RegistryError> {
        let path = self
            .root
            .clone()
            .join(name)
            .join(version.to_string())
            .join(file);
        match self.store.get(&path).await {
            Ok(result) => Ok(result.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(RegistryError::ArtifactMissing {
                model: name.to_string(),
                version,
                file: file.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &std::path::Path, path: &str, body: &[u8]) {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, body).unwrap();
    }

    #[tokio::test]
    async fn reads_models_versions_and_configs_the_triton_way() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a/config.pbtxt",
            b"name: \"a\"\nmax_batch_size: 8\n",
        );
        write(dir.path(), "a/1/model.onnx", b"one");
        write(dir.path(), "a/3/model.onnx", b"three");
        write(dir.path(), "a/07/model.onnx", b"ignored: starts with zero");
        write(dir.path(), "a/latest/model.onnx", b"ignored: not a number");
        write(dir.path(), "b/2/model.onnx", b"two");
        write(dir.path(), ".hidden/1/model.onnx", b"x");
        let repo = ModelRepository::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(repo.model_names().await.unwrap(), vec!["a", "b"]);
        let a = repo.model("a").await.unwrap();
        assert_eq!(a.versions, vec![1, 3]);
        assert_eq!(a.config.unwrap().max_batch_size, 8);
        let b = repo.model("b").await.unwrap();
        assert!(b.config.is_none());
        assert_eq!(
            repo.artifact("a", 3, "model.onnx").await.unwrap(),
            Bytes::from("three")
        );
        assert!(matches!(
            repo.artifact("a", 2, "model.onnx").await,
            Err(RegistryError::ArtifactMissing { version: 2, .. })
        ));
        assert!(matches!(
            repo.model("c").await,
            Err(RegistryError::ModelNotFound(_))
        ));
        assert!(matches!(
            repo.model("../a").await,
            Err(RegistryError::ModelNotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_file_url_is_the_same_repository() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/1/model.onnx", b"x");
        let url = format!("file://{}", dir.path().canonicalize().unwrap().display());
        let repo = ModelRepository::open(&url).unwrap();
        assert_eq!(repo.model_names().await.unwrap(), vec!["m"]);
        assert_eq!(repo.model("m").await.unwrap().versions, vec![1]);
    }

    #[tokio::test]
    async fn bad_configs_and_locations_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/config.pbtxt", b"max_batch_size: \"eight\"");
        let repo = ModelRepository::open(dir.path().to_str().unwrap()).unwrap();
        let err = repo.model("m").await.unwrap_err().to_string();
        assert!(err.starts_with("model 'm': config.pbtxt:"), "{err}");
        let err = ModelRepository::open("/no/such/dir")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/dir"), "{err}");
    }
}
