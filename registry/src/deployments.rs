//! Where canary deployments keep their state, so that it survives a restart and every server
//! following the registry agrees on it. The registry stores each deployment as a log of
//! create-only records, like the references: `{model}/deployments/{number:06}/{revision:012}.json`,
//! each the whole state after one decision. Of two servers deciding at the same moment exactly one
//! writes the next revision; the other finds it taken, reads it and follows.
//!
//! What a record says (steps, guardrails, decisions) is serving's business: here it is JSON, so
//! the registry knows the mechanics and nothing of canaries.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde_json::Value;

use crate::RegistryError;
use crate::refs::{parse_revision_file, revision_file};
use crate::registry::Registry;

/// Digits of a deployment's number in its folder name.
const NUMBER_DIGITS: usize = 6;

/// One revision of a deployment's state.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRecord {
    pub model: String,
    pub number: u64,
    pub revision: u64,
    pub state: Value,
}

impl Registry {
    fn deployments_dir(&self, model: &str) -> Path {
        self.model_dir(model).join("deployments")
    }

    fn deployment_dir(&self, model: &str, number: u64) -> Path {
        self.deployments_dir(model)
            .join(format!("{number:0NUMBER_DIGITS$}"))
    }

    /// The model's deployments from number `from` on (0 or 1: all), oldest first, as (number,
    /// latest revision) pairs; lists only those, so a server polling the current deployment
    /// reads little however many came before it.
    pub async fn deployments_from(
        &self,
        model: &str,
        from: u64,
    ) -> Result<Vec<(u64, u64)>, RegistryError> {
        let dir = self.deployments_dir(model);
        // Everything listed after the offset: `from`'s own records sort after its folder name.
        let offset = dir.clone().join(format!("{from:0NUMBER_DIGITS$}"));
        let objects: Vec<_> = self
            .store
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await?;
        let mut latest: std::collections::BTreeMap<u64, u64> = Default::default();
        for object in objects {
            let mut parts = object
                .location
                .parts()
                .collect::<Vec<_>>()
                .into_iter()
                .rev();
            let (Some(file), Some(folder)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Some(revision), Ok(number)) = (
                parse_revision_file(file.as_ref()),
                folder.as_ref().parse::<u64>(),
            ) else {
                continue;
            };
            if folder.as_ref().len() == NUMBER_DIGITS && number >= from {
                let entry = latest.entry(number).or_default();
                *entry = (*entry).max(revision);
            }
        }
        Ok(latest.into_iter().collect())
    }

    /// The latest revision of deployment `number` if it is newer than `revision`.
    pub async fn deployment_after(
        &self,
        model: &str,
        number: u64,
        revision: u64,
    ) -> Result<Option<DeploymentRecord>, RegistryError> {
        let dir = self.deployment_dir(model, number);
        let offset = dir.clone().join(revision_file(revision));
        let newer: Vec<_> = self
            .store
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await?;
        let latest = newer
            .iter()
            .filter_map(|o| Some((parse_revision_file(o.location.filename()?)?, &o.location)))
            .filter(|(r, _)| *r > revision)
            .max_by_key(|(r, _)| *r);
        let Some((latest, path)) = latest else {
            return Ok(None);
        };
        let bytes = self.store.get(path).await?.bytes().await?;
        let state = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Corrupt(format!(
                "{model} deployment {number} revision {latest}: {e}"
            ))
        })?;
        Ok(Some(DeploymentRecord {
            model: model.to_string(),
            number,
            revision: latest,
            state,
        }))
    }

    /// Writes revision `revision` of deployment `number` (revision 1 creates the deployment).
    /// Create-only: if another writer recorded that revision first, nothing is written and the
    /// answer is `Conflict`; the caller reads the newer state and decides again.
    pub async fn write_deployment(
        &self,
        model: &str,
        number: u64,
        revision: u64,
        state: &Value,
    ) -> Result<DeploymentRecord, RegistryError> {
        if number == 0 || revision == 0 {
            return Err(RegistryError::Invalid(
                "deployment numbers and revisions start at 1".into(),
            ));
        }
        if self.versions(model).await?.is_empty() {
            return Err(RegistryError::ModelNotFound(model.to_string()));
        }
        let path = self
            .deployment_dir(model, number)
            .join(revision_file(revision));
        let json = serde_json::to_vec_pretty(state).expect("JSON values serialize");
        match self
            .store
            .put_opts(
                &path,
                PutPayload::from(json),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(DeploymentRecord {
                model: model.to_string(),
                number,
                revision,
                state: state.clone(),
            }),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(RegistryError::Conflict(format!(
                    "deployment {number} of '{model}' already has revision {revision}: another server decided first"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }
}
